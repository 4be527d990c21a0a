"""GRPO training of Qwen2-VL on medical multiple-choice VQA (Med-R1), one file, top to bottom.

    python train.py                              # embedded tiny model + synthetic data, CPU
    torchrun --nproc_per_node 2 train.py         # the same on two processes (gloo), FSDP2
    torchrun --nproc_per_node 8 train.py --model /models/Qwen2-VL-2B-Instruct --data /data/OmniMedVQA

Each step: sample G completions per prompt -> score them with rule rewards ->
advantages within each group -> one clipped, KL-regularised policy update
(grpo.py has the equations) -> log -> (sometimes) evaluate and save.

Shapes: B prompts on this rank, G samples per prompt, N = B*G, T completion tokens.
"""

import dataclasses
import json
import os
import random
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import grpo
import model as modellib
import rewards


@dataclass
class Config:
    # what to train
    model: str = ""  # local Hugging Face folder (Qwen2-VL / Qwen2.5-VL); empty = the embedded tiny model
    data: str = ""  # OmniMedVQA root (QA_information/, Images/); empty = synthetic data made in cache_dir
    modalities: str = ""  # comma-separated Med-R1 modality names (CT, MRI, ...); empty = all
    question_types: str = ""  # comma-separated; empty = all (Modality Recognition for the synthetic data)
    prompt_mode: str = "think-after"  # think-after (answer, then rationale), think-before or no-think
    rewards: str = "format,accuracy"  # names in rewards.REWARDS, summed with equal weights
    # GRPO (Med-R1's values)
    num_generations: int = 8  # G completions per prompt (Med-R1: 4)
    prompts_per_step: int = 8  # prompts per optimizer step over all ranks (Med-R1: 4)
    beta: float = 0.04  # weight of the k3 KL to the frozen reference; 0 loads no reference
    eps_low: float = 0.2  # clip range below 1 for the probability ratio
    eps_high: float = 0.2  # clip range above 1 (DAPO's clip-higher uses 0.28)
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    top_p: float = 1.0  # nucleus sampling
    max_new_tokens: int = 32  # completion length limit (Med-R1: 256)
    # optimisation
    steps: int = 600  # optimizer steps
    lr: float = 0.0  # peak learning rate, decayed linearly to 0; 0 = 5e-4 for the tiny model, 1e-6 (Med-R1) otherwise
    weight_decay: float = 0.0  # AdamW weight decay (Med-R1: 0)
    grad_clip: float = 1.0  # max gradient norm
    dtype: str = "auto"  # bf16 or fp32 parameters in forward/backward (fp32 master weights); auto = bf16 on CUDA
    # images
    image_size: int = 384  # images are resized to this square first (Med-R1: 384); 0 = keep size
    max_pixels: int = 0  # pixel budget per image after resizing; 0 = the processor's own (Med-R1: 401408)
    # bookkeeping
    output_dir: str = "runs/tiny"  # checkpoints, metrics.jsonl, eval results
    cache_dir: str = ".cache"  # the tiny model and synthetic data are built here once
    eval_every: int = 100  # evaluate on held-out questions every N steps (0 = only before and after)
    eval_size: int = 320  # held-out questions per evaluation (0 = all)
    save_every: int = 0  # save a checkpoint every N steps (0 = only at the end)
    seed: int = 0  # data order, sampling and the tiny model's build


def parse_args(config_class, argv=None):
    """--field value for every dataclass field; booleans take true/false."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(config_class)
    values = {}
    for flag, value in zip(argv[::2], argv[1::2]):
        name = flag.removeprefix("--").replace("-", "_")
        if not flag.startswith("--") or name not in hints:
            raise SystemExit(f"unknown flag {flag!r}; flags are: " + " ".join(f"--{f}" for f in hints))
        try:
            values[name] = (value.lower() in ("1", "true", "yes")) if hints[name] is bool else hints[name](value)
        except ValueError:
            raise SystemExit(f"--{name} wants a {hints[name].__name__}, got {value!r}")
    if len(argv) % 2:
        raise SystemExit(f"flag {argv[-1]!r} has no value")
    return config_class(**values)


def resolve(cfg: Config, world: int) -> Config:
    """Fill the automatic values and check cross-field rules once, up front."""
    if not cfg.lr:
        cfg.lr = 1e-6 if cfg.model else 5e-4
    if cfg.dtype == "auto":
        cfg.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the {world} ranks")
    if cfg.prompt_mode not in data.PROMPTS:
        raise SystemExit(f"--prompt_mode must be one of {list(data.PROMPTS)}")
    unknown = set(cfg.rewards.split(",")) - set(rewards.REWARDS)
    if unknown:
        raise SystemExit(f"unknown rewards {sorted(unknown)}; known: {list(rewards.REWARDS)}")
    if cfg.num_generations < 2:
        raise SystemExit("--num_generations must be at least 2: advantages are relative to the group")
    return cfg


def setup_distributed() -> torch.device:
    """One process group for python and torchrun alike: NCCL on CUDA, gloo on CPU."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def print0(*args) -> None:
    """Print on rank 0 only, without breaking the progress bar."""
    if dist.get_rank() == 0:
        tqdm.write(" ".join(str(a) for a in args))


def dataset_root(cfg) -> str:
    """--data, or the synthetic dataset in cache_dir, written once by rank 0."""
    if cfg.data:
        return cfg.data
    root = Path(cfg.cache_dir) / "synthetic-omnimedvqa"
    if dist.get_rank() == 0:
        data.make_synthetic(root)
    dist.barrier()
    return str(root)


def model_path(cfg, root: str) -> str:
    """--model, or the tiny model in cache_dir, built once by rank 0 (about a minute)."""
    if cfg.model:
        return cfg.model
    folder = Path(cfg.cache_dir) / "tiny-qwen2-vl"
    if dist.get_rank() == 0 and not folder.exists():
        print0(f"building the tiny model in {folder} (once)")
        modellib.build_tiny(folder, root)
    dist.barrier()
    return str(folder)


def load_split(cfg, root: str, side: str) -> list[dict]:
    """The train or test side of the dataset after the modality and question-type filters.

    The synthetic data defaults to its Modality Recognition questions: the task
    the tiny model learns in minutes.
    """
    question_types = cfg.question_types or ("" if cfg.data else "Modality Recognition")
    samples = data.load_omnimedvqa(root, [m for m in cfg.modalities.split(",") if m],
                                   [q for q in question_types.split(",") if q])
    train_samples, test_samples = data.split_by_image(samples)
    return train_samples if side == "train" else test_samples


def score(texts: list[str], samples: list[dict], names: list[str]) -> torch.Tensor:
    """Rewards (N, R): one column per reward function, rows in completion order."""
    return torch.tensor([[rewards.REWARDS[name](text, sample) for name in names]
                         for text, sample in zip(texts, samples)])


def mean_over_ranks(values: dict) -> dict:
    """Average a dict of floats over ranks (for logging)."""
    stacked = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / dist.get_world_size()).tolist()))


def main():
    import eval as evaluation  # eval.py imports this file; import late to keep the cycle harmless

    device = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = resolve(parse_args(Config), world)
    print0("config:", json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(cfg.seed)

    # ---- model, reference, processor
    root = dataset_root(cfg)
    path = model_path(cfg, root)
    processor = modellib.Processor.from_pretrained(path, max_pixels=cfg.max_pixels)
    policy = modellib.load_model(path).to(device)
    modellib.shard(policy, bf16=cfg.dtype == "bf16")
    reference = None
    if cfg.beta != 0:
        reference = modellib.load_model(path).to(device).requires_grad_(False)
        modellib.shard(reference, bf16=cfg.dtype == "bf16")
    end_ids = modellib.end_token_ids(policy, processor.tokenizer)
    banned_ids = processor.tokenizer.convert_tokens_to_ids(modellib.VISION_TOKENS)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / cfg.steps)

    # ---- data: every rank walks the same shuffled order and takes its slice of each step's prompts
    train_samples = [dict(s, mode=cfg.prompt_mode) for s in load_split(cfg, root, "train")]
    held_out = load_split(cfg, root, "test")
    random.Random(cfg.seed).shuffle(held_out)  # a subset of it keeps the letter balance
    held_out = held_out[:cfg.eval_size or None]
    print0(f"{len(train_samples)} training and {len(held_out)} held-out questions from {root}")
    order_rng = torch.Generator().manual_seed(cfg.seed)
    sampling_rng = torch.Generator().manual_seed(cfg.seed + 1)
    order = []
    B, G = cfg.prompts_per_step // world, cfg.num_generations
    reward_names = cfg.rewards.split(",")
    image_size = cfg.image_size or None
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None

    def run_eval(step: int) -> float:
        summary = evaluation.evaluate(policy, processor, held_out, cfg.prompt_mode, device,
                                      max_new_tokens=cfg.max_new_tokens, image_size=image_size)
        print0(f"step {step}: held-out accuracy {summary['accuracy']:.3f} "
               f"({summary['questions']} questions, parse failures {summary['parse_failures']:.3f})")
        return summary["accuracy"]

    base_accuracy = run_eval(0)
    progress = tqdm(range(1, cfg.steps + 1), disable=rank != 0, desc="grpo")
    for step in progress:
        t0 = time.time()
        # ---- rollout: G completions for each of this rank's B prompts
        while len(order) < cfg.prompts_per_step:
            order += torch.randperm(len(train_samples), generator=order_rng).tolist()
        step_indices, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        samples = [train_samples[i] for i in step_indices[rank * B:(rank + 1) * B]]
        prompts = data.collate(samples, processor, cfg.prompt_mode, image_size).to(device)
        rollout = modellib.sample(policy, prompts, G, cfg.max_new_tokens, end_ids, banned_ids, cfg.temperature,
                                  cfg.top_p, generator=sampling_rng, rows=(rank * B * G, world * B * G))
        t_rollout = time.time() - t0

        # ---- rewards and group-relative advantages (groups never span ranks: a rank holds whole groups)
        texts = modellib.decode(processor.tokenizer, rollout)
        row_samples = [s for s in samples for _ in range(G)]  # row i belongs to prompt i // G
        reward_table = score(texts, row_samples, reward_names)  # (N, R)
        advantages = grpo.group_advantages(reward_table.sum(dim=1), G).to(device)  # (N,)

        # ---- policy update
        expanded = data.repeat_prompts(prompts, G)  # (N, P) rows, each with its own prompt's image
        mask = rollout.completion_mask
        logprobs = modellib.token_logprobs(policy, expanded, rollout.completion_ids, mask, cfg.temperature)
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad():
                ref_logprobs = modellib.token_logprobs(reference, expanded, rollout.completion_ids, mask,
                                                       cfg.temperature)
        # One update per rollout: the old policy is the current one, so the ratio is exactly 1.
        loss, loss_metrics = grpo.policy_loss(logprobs, logprobs.detach(), ref_logprobs, advantages, mask,
                                              beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        schedule.step()

        # ---- log
        choices = [rewards.extract_choice(t, s["options"]) for t, s in zip(texts, row_samples)]
        spread = reward_table.sum(dim=1).view(-1, G).std(dim=1) > 0  # (B,): groups that carry signal
        local = {
            "loss": loss.item(),
            "reward": reward_table.sum(dim=1).mean().item(),
            **{f"reward_{n}": reward_table[:, i].mean().item() for i, n in enumerate(reward_names)},
            "groups_with_spread": spread.float().mean().item(),
            "completion_len": mask.sum(dim=1).float().mean().item(),
            "truncated": rollout.truncated.float().mean().item(),
            **{f"letter_{L}": sum(c == L for c in choices) / len(choices) for L in data.LETTERS},
            **loss_metrics,
        }
        logged = {"step": step, **mean_over_ranks(local), "grad_norm": grad_norm.item(),
                  "lr": schedule.get_last_lr()[0], "rollout_s": t_rollout, "step_s": time.time() - t0}
        if rank == 0:
            metrics_file.write(json.dumps(logged) + "\n")
            metrics_file.flush()
            progress.set_postfix(reward=f"{logged['reward']:.2f}", acc=f"{logged.get('reward_accuracy', 0):.2f}")
            letters = " ".join(f"{L}:{logged[f'letter_{L}']:.2f}" for L in data.LETTERS)
            print0(f"step {step} reward {logged['reward']:.3f} format {logged.get('reward_format', 0):.2f} "
                   f"accuracy {logged.get('reward_accuracy', 0):.2f} kl {logged['kl']:.4f} "
                   f"len {logged['completion_len']:.1f} spread {logged['groups_with_spread']:.2f} "
                   f"letters {letters} {logged['step_s']:.2f}s")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0:
            modellib.save_checkpoint(policy, processor, out / f"step-{step}",
                                     {"train_config.json": dataclasses.asdict(cfg)})

    final_accuracy = run_eval(cfg.steps)
    modellib.save_checkpoint(policy, processor, out / "final", {"train_config.json": dataclasses.asdict(cfg)})
    print0(f"held-out accuracy: base {base_accuracy:.3f} -> final {final_accuracy:.3f} "
           f"({(final_accuracy - base_accuracy) * 100:+.1f} points); checkpoint in {out / 'final'}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
