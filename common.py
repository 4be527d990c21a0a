"""What every entry script does around its work: flags, process group, rank-0 output, collectives.

The same scripts run under `python` (one process, a one-rank group) and under
`torchrun` (one process per rank): NCCL on CUDA, gloo on the CPU. Rank 0 alone
prints and writes files; `print0` and `Log` do nothing on the other ranks.
"""

import argparse
import contextlib
import inspect
import json
import math
import os
import re
import statistics
import typing
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm


# A config field and its trailing comment: "    lr: float = 0.0  # peak learning rate".
FIELD_LINE = re.compile(r"^\s+(\w+): .*?  # (.*)$")


def parse_args(config_class, argv=None):
    """A dataclass of settings from the command line (--field value or --field=value; --help).

    Each field's help is its comment in the class; values are checked by type here,
    and by range in the entry script's resolve().
    """
    source = inspect.getsource(config_class).splitlines()
    comments = dict(match.groups() for line in source if (match := FIELD_LINE.match(line)))
    parser = argparse.ArgumentParser(description=config_class.__doc__, allow_abbrev=False)
    for field, hint in typing.get_type_hints(config_class).items():
        default = getattr(config_class, field)
        # argparse formats help text with %.
        help_text = comments.get(field, "").replace("%", "%%") + f" (default: {default!r})"
        if typing.get_origin(hint) is typing.Literal:
            # A field typed Literal["a", "b"] takes one of those values; --help lists them.
            parser.add_argument(f"--{field}", choices=typing.get_args(hint), default=default,
                                help=help_text)
            continue
        parser.add_argument(f"--{field}", type=boolean if hint is bool else hint,
                            default=default, metavar=hint.__name__, help=help_text)
    return config_class(**vars(parser.parse_args(argv)))


# Allowed values of a flag: a test and how to say it.
AT_LEAST_0 = (lambda v: v >= 0, "at least 0")
AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
ABOVE_0 = (lambda v: v > 0, "above 0")


def is_number_list(text: str) -> bool:
    """Whether text is empty or comma-separated finite numbers."""
    try:
        return not text or all(math.isfinite(float(word)) for word in text.split(","))
    except ValueError:
        return False


NUMBERS = (is_number_list, "comma-separated numbers")


def names_in(known) -> tuple:
    """A comma-separated list of distinct names from known (empty is fine)."""
    def test(text):
        names = [n for n in text.split(",") if n]
        return set(names) <= set(known) and len(set(names)) == len(names)
    return (test, f"distinct comma-separated names from {list(known)}, no spaces")


def check_flags(cfg, limits: dict) -> None:
    """Stop with a message naming the flag whose value breaks its rule: a Literal field's
    values, or limits (field -> rule)."""
    for name, hint in typing.get_type_hints(type(cfg)).items():
        if typing.get_origin(hint) is typing.Literal:
            limits = {name: (lambda v, allowed=typing.get_args(hint): v in allowed,
                             f"one of {list(typing.get_args(hint))}"), **limits}
    for name, (test, allowed) in limits.items():
        if not test(getattr(cfg, name)):
            raise SystemExit(f"--{name} {getattr(cfg, name)!r}: must be {allowed}")


def boolean(text: str) -> bool:
    """true/false, yes/no, 1/0; anything else is an error, never a silent false."""
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"want true or false, got {text!r}")


def setup_distributed() -> torch.device:
    """One process group for python and torchrun alike: NCCL on CUDA, gloo on CPU."""
    # Everything is local: never reach for the hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        # Before NCCL starts.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return collective_device()


def finish_distributed() -> None:
    """Leave together: a rank that tears gloo down while rank 0 still writes its files can abort."""
    dist.barrier()
    dist.destroy_process_group()


def print0(*args) -> None:
    """Print on rank 0 only, without breaking the progress bar."""
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def collective_device() -> torch.device:
    """Where tensors for collectives live: NCCL only moves CUDA tensors, gloo CPU ones."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def reduce_over_ranks(metrics: dict) -> dict:
    """A step's metrics over every rank, one collective per kind, told apart by name.

    x_min and x_max: the extreme over ranks (a rank with nothing to report sends
    inf or -inf; an extreme that no rank has is left out). x_sum, a sum over
    this rank's trained tokens: x, the mean per token over every rank's
    "tokens". Anything else: the mean over ranks.
    """
    kinds = {key: key[-3:] if key.endswith(("_min", "_max")) else "sum" for key in metrics}
    reduced = {}
    for kind in ("sum", "min", "max"):
        keys = [key for key in metrics if kinds[key] == kind]
        if not keys:
            continue
        values = torch.tensor([metrics[key] for key in keys], dtype=torch.float64,
                              device=collective_device())
        dist.all_reduce(values, op=getattr(dist.ReduceOp, kind.upper()))
        reduced.update(zip(keys, values.tolist()))
    tokens = max(reduced.pop("tokens", 0.0), 1e-12)
    logged = {}
    for key, value in reduced.items():
        if key.endswith("_sum"):
            logged[key.removesuffix("_sum")] = value / tokens
        elif kinds[key] == "sum":
            logged[key] = value / dist.get_world_size()
        elif math.isfinite(value):
            logged[key] = value
    return logged


def update_sums(updates: list[tuple[dict, float]]) -> dict:
    """The metrics of this rank's (policy_loss metrics, tokens) updates, for reduce_over_ranks:
    per-token means as sums over the tokens (x_sum, and "tokens"), the extremes over the
    updates with tokens (an update with none counts for nothing), loss and grad_norm (already
    global) as means over the updates."""
    tokens = sum(n for _, n in updates)
    summary = {"tokens": tokens}
    for key in updates[0][0]:
        if key in ("loss", "grad_norm"):
            summary[key] = statistics.fmean(m[key] for m, _ in updates)
        elif key.endswith("_min"):
            summary[key] = min((m[key] for m, n in updates if n), default=math.inf)
        elif key.endswith("_max"):
            summary[key] = max((m[key] for m, n in updates if n), default=-math.inf)
        else:
            summary[f"{key}_sum"] = sum(m[key] * n for m, n in updates)
    return summary


def lr_factor(update: int, total: int, schedule: str, warmup_ratio: float) -> float:
    """The lr's share of its peak at an update: up from 0 over ceil(warmup_ratio x total)
    updates, then down to 0, linearly or as a half cosine (as transformers' schedules)."""
    warmup = math.ceil(warmup_ratio * total)
    if update < warmup:
        return update / warmup
    progress = (update - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else
               1 - progress)


def rows_or_stand_in(rows: torch.Tensor, G: int) -> tuple[torch.Tensor, float]:
    """(rows, weight 1), or for a rank with no rows one group's rows with weight 0: every rank
    must still run the same forwards and backward, so FSDP's collectives match."""
    return (rows, 1.0) if len(rows) else (torch.arange(G), 0.0)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's (N,) tensor in rank order: (world * N,), on the collective device."""
    values = values.to(collective_device())
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.cat(parts)


class Log:
    """A run's records on rank 0: metrics.jsonl, rollouts.jsonl, TensorBoard (when installed),
    Weights & Biases (with a config to log), the one-line summary of each step and curves.png.
    On every other rank each method does nothing."""

    def __init__(self, out: Path, reward_names: list[str], wandb_config: dict | None = None):
        self.active = dist.get_rank() == 0
        self.out, self.reward_names, self.recent, self.wandb = out, reward_names, [], None
        if self.active:
            out.mkdir(parents=True, exist_ok=True)
            self.files = {name: open(out / f"{name}.jsonl", "a")
                          for name in ("metrics", "rollouts")}
            self.tensorboard = tensorboard_writer(out)
            if wandb_config is not None:
                self.wandb = wandb_run(out, wandb_config)

    def write(self, name: str, record: dict) -> None:
        """One line of record in name.jsonl (and rollouts as a table in W&B)."""
        if self.active:
            self.files[name].write(json.dumps(record) + "\n")
            self.files[name].flush()
        if self.wandb and name == "rollouts":
            rows = [[c, sum(r)] for c, r in zip(record["completions"], record["rewards"])]
            table = self.wandb.Table(columns=["completion", "reward"], data=rows)
            self.wandb.log({"rollouts": table}, step=record["step"])

    def step(self, step: int, metrics: dict, step_s: float, lr: float, completions: int) -> dict:
        """A step's metrics over all ranks (reduce_over_ranks: a collective), with timings and
        lr. On rank 0 they go to metrics.jsonl and TensorBoard, a printed line, and every
        tenth step a warning if the last ten look like a run that learns nothing."""
        logged = {"step": step, **reduce_over_ranks(metrics), "lr": lr, "step_s": step_s}
        if "rollout_s" in logged:
            logged["update_s"] = step_s - logged["rollout_s"]
            # Sampled completion tokens per second of rollout, all ranks.
            tokens = logged["completion_len"] * completions
            logged["tokens_per_s"] = tokens / max(logged["rollout_s"], 1e-9)
        if not self.active:
            return logged
        self.write("metrics", logged)
        for key, value in logged.items() if self.tensorboard else ():
            self.tensorboard.add_scalar(key, value, logged["step"])
        if self.wandb:
            self.wandb.log(logged, step=step)
        print0(self.summary(logged))
        self.recent = (self.recent + [logged])[-10:]
        if logged["step"] % 10 == 0 and "truncated" in logged:
            truncated = sum(m["truncated"] for m in self.recent) / len(self.recent)
            zero_std = sum(m["zero_std_groups"] for m in self.recent) / len(self.recent)
            if truncated > 0.5:
                print0(f"warning: {truncated:.0%} of completions hit --max_new_tokens: raise it, "
                       "or see rollouts.jsonl")
            if zero_std > 0.9:
                print0(f"warning: {zero_std:.0%} of groups have equal rewards, so no policy "
                       "gradient (fine only if the reward is at its maximum): raise "
                       "--num_generations or --temperature, or see rollouts.jsonl")
        return logged

    def summary(self, m: dict) -> str:
        """The one-line summary of a step: each reward, the KL, length, zero-std groups, letters."""
        # optimizer_step skips an update whose loss or gradient is not finite.
        skipped = "" if math.isfinite(m["grad_norm"]) else " (non-finite: update skipped)"
        if "reward" not in m:
            return f"step {m['step']} loss {m['loss']:.4f} {m['step_s']:.2f}s{skipped}"
        each = " ".join(f"{name} {m[f'reward_{name}']:.2f}" for name in self.reward_names)
        letters = " ".join(f"{k.removeprefix('letter_')}:{v:.2f}" for k, v in m.items()
                           if k.startswith("letter_"))
        return (f"step {m['step']} reward {m['reward']:.3f} {each} kl {m['kl']:.4f} "
                f"len {m['completion_len']:.1f} zero-std {m['zero_std_groups']:.2f} "
                f"letters {letters} {m['step_s']:.2f}s{skipped}")

    def finish(self) -> None:
        """curves.png: reward, accuracy, completion length and loss per step (needs matplotlib);
        the W&B run ends."""
        if self.wandb:
            self.wandb.finish()
        plt = pyplot("curves.png") if self.active else None
        if plt is None:
            return
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        logged = [json.loads(line) for line in lines]
        names = [n for n in ("reward", "reward_accuracy", "completion_len", "loss")
                 if n in logged[-1]]
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3))
        for ax, name in zip(list(axes) if len(names) > 1 else [axes], names):
            steps = [m for m in logged if name in m]
            ax.plot([m["step"] for m in steps], [m[name] for m in steps])
            ax.set_title(name)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)


@contextlib.contextmanager
def named_step(step: int):
    """A sampler that met non-finite logits stops the run with a message naming the step."""
    try:
        yield
    except FloatingPointError as error:
        raise SystemExit(f"step {step}: {error}; lower --lr, or resume from an earlier "
                         "checkpoint") from error


def wandb_run(out: Path, config: dict):
    """The wandb module with a run started in out/wandb (WANDB_MODE=offline needs no network)."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--report_to wandb: pip install wandb (an optional extra)") from None
    wandb.init(project=os.environ.get("WANDB_PROJECT", "med-r1-grpo"), name=out.name,
               dir=out, config=config)
    return wandb


def tensorboard_writer(out: Path):
    """A TensorBoard writer when tensorboard is installed (an optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(out / "tensorboard")


def pyplot(what: str):
    """matplotlib.pyplot drawing to files, or None (and a note) without matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0(f"matplotlib is not installed: skipping {what} (pip install matplotlib)")
        return None
    return plt
