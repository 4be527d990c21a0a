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
import math
import os
import random
import shutil
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
    train_split: str = ""  # Med-R1 split file(s), comma-separated, images under --data; empty = 80/20 by image
    test_split: str = ""  # the held-out split file(s) evaluated during training; empty = the 20% side
    drop_test_images: bool = True  # no image on both sides, only its questions kept apart when false (Med-R1's files)
    prompt_mode: str = "think-after"  # think-after (answer, then rationale), think-before or no-think
    rewards: str = "format,accuracy"  # names in rewards.REWARDS, summed with equal weights
    algo: str = "grpo"  # grpo, or sft: supervised on the gold answer tag (the paper's baseline)
    # GRPO (Med-R1's values; grpo.py has the equations)
    num_generations: int = 8  # G completions per prompt (Med-R1: 4)
    prompts_per_step: int = 16  # prompts per rollout over all ranks (Med-R1: 4)
    beta: float = 0.04  # weight of the k3 KL to the frozen reference; 0 loads no reference
    eps_low: float = 0.2  # clip range below 1 for the probability ratio
    eps_high: float = 0.2  # clip range above 1 (DAPO's clip-higher uses 0.28)
    loss_type: str = "grpo"  # grpo (per-sequence mean), dapo (token mean) or dr_grpo (constant denominator)
    scale_rewards: str = "group"  # advantages divided by the group's std, the batch's (batch) or not (none)
    num_iterations: int = 1  # mu: policy updates per rollout; > 1 makes the ratio depart from 1
    minibatches: int = 1  # each rollout is split into this many optimizer steps, per iteration
    filter_zero_std: bool = False  # drop groups whose rewards are all equal from the update (DAPO)
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens without an end token
    ref_sync_every: int = 0  # every N steps set ref = a * policy + (1 - a) * ref (0 = frozen reference)
    ref_sync_alpha: float = 0.6  # a above
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # draw only among the k most likely tokens (Med-R1: 50, transformers' default); 0 = all
    max_new_tokens: int = 32  # completion length limit (Med-R1: 256)
    # optimisation
    steps: int = 600  # rollouts (GRPO) or batches (SFT)
    epochs: float = 0  # when > 0, steps = epochs x training questions / prompts_per_step (replaces --steps)
    lr: float = 0.0  # peak learning rate, decayed linearly to 0; 0 = 5e-4 for the tiny model, 1e-6 (Med-R1) otherwise
    weight_decay: float = 0.0  # AdamW weight decay (Med-R1: 0)
    grad_clip: float = 1.0  # max gradient norm
    dtype: str = "auto"  # bf16 or fp32 parameters in forward/backward (fp32 master weights); auto = bf16 on CUDA
    compile_decode: bool = False  # torch.compile the one-token decode forward of the rollout (first call compiles)
    grad_checkpointing: bool = False  # recompute decoder layers in backward: less memory for long completions
    hybrid_shard: bool = False  # multi-node: shard within each node, replicate across nodes (2-D mesh)
    # images
    image_size: int = 384  # images are resized to this square first (Med-R1: 384); 0 = keep size
    max_pixels: int = 0  # pixel budget per image after resizing; 0 = the processor's own (Med-R1: 401408)
    # bookkeeping
    output_dir: str = "runs/tiny"  # checkpoints, metrics.jsonl, eval results
    cache_dir: str = ".cache"  # the tiny model and synthetic data are built here once
    eval_every: int = 100  # evaluate on held-out questions every N steps (0 = only before and after)
    eval_size: int = 320  # held-out questions per evaluation (0 = all)
    save_every: int = 100  # save a resumable checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # keep the newest K step-N checkpoints (final is always kept)
    resume: str = ""  # auto = the newest step-N in output_dir (if any); or a checkpoint folder
    max_skipped_steps: int = 5  # a non-finite loss or gradient skips the update; this many in a row stop the run
    rollouts_every: int = 10  # write one prompt's completions and rewards to rollouts.jsonl every N steps
    skip_bad_records: bool = False  # skip (and count) records with bad fields or unreadable images instead of stopping
    max_prompt_tokens: int = 0  # stop before training if a prompt with its image tokens is longer (0 = no limit)
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
    if cfg.num_generations < 2 and cfg.algo == "grpo":
        raise SystemExit("--num_generations must be at least 2: advantages are relative to the group")
    for name, allowed in [("algo", ("grpo", "sft")), ("loss_type", ("grpo", "dapo", "dr_grpo")),
                          ("scale_rewards", ("group", "batch", "none"))]:
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} must be one of {allowed}, got {getattr(cfg, name)!r}")
    if cfg.minibatches > cfg.prompts_per_step:
        raise SystemExit(f"--minibatches {cfg.minibatches} exceeds --prompts_per_step {cfg.prompts_per_step}")
    return cfg


def setup_distributed() -> torch.device:
    """One process group for python and torchrun alike: NCCL on CUDA, gloo on CPU."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # before NCCL starts
    if "RANK" in os.environ:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return collective_device()


def finish_distributed() -> None:
    """Leave together: a rank that tears gloo down while rank 0 still writes its files can abort (SIGABRT)."""
    dist.barrier()
    dist.destroy_process_group()


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


def load_data(cfg, root: str, train_split: str = "", test_split: str = "",
              drop_test_images: bool = True) -> tuple[list[dict], list[dict]]:
    """data.load_splits with the config's filters, printing what was held apart; the synthetic data
    defaults to its Modality Recognition questions (the task the tiny model learns in minutes)."""
    question_types = cfg.question_types or ("" if cfg.data else "Modality Recognition")
    errors = [] if cfg.skip_bad_records else None
    train, test, notes = data.load_splits(root, [m for m in cfg.modalities.split(",") if m],
                                          [q for q in question_types.split(",") if q], train_split, test_split,
                                          drop_test_images, errors)
    for note in notes:
        print0(note)
    if errors:
        print0(f"skipped {len(errors)} bad records; the first: {errors[0]}")
    return train, test


def check_prompt_lengths(cfg, processor, samples: list[dict], visual_tokens: int) -> None:
    """Stop before training if a prompt (chat text plus its image tokens) exceeds --max_prompt_tokens.

    Prompts are never truncated: cutting through the image tokens would break
    the model's forward, cutting the options would change the question.
    """
    if not cfg.max_prompt_tokens:
        return
    texts = [data.chat_text(processor.tokenizer, s, cfg.prompt_mode) for s in samples]
    lengths = [len(ids) - 1 + visual_tokens for ids in processor.tokenizer(texts)["input_ids"]]  # one pad becomes many
    too_long = [(s["id"], n) for s, n in zip(samples, lengths) if n > cfg.max_prompt_tokens]
    if too_long:
        raise data.DataError(f"{len(too_long)} prompts exceed --max_prompt_tokens {cfg.max_prompt_tokens}, "
                             f"e.g. record {too_long[0][0]!r} with {too_long[0][1]} tokens: raise the limit, lower "
                             "--image_size, or remove those records")


def score(texts: list[str], samples: list[dict], names: list[str]) -> torch.Tensor:
    """Rewards (N, R): one column per reward function, rows in completion order."""
    table = []
    for text, sample in zip(texts, samples):
        row = []
        for name in names:
            try:
                row.append(float(rewards.REWARDS[name](text, sample)))
            except Exception as error:
                raise RuntimeError(f"reward {name!r} failed on sample {sample['id']!r}: {error!r}") from error
        table.append(row)
    return torch.tensor(table)


def collective_device() -> torch.device:
    """Where tensors for collectives live: NCCL only moves CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def mean_over_ranks(values: dict) -> dict:
    """Average a dict of floats over ranks (for logging)."""
    stacked = torch.tensor(list(values.values()), dtype=torch.float64, device=collective_device())
    dist.all_reduce(stacked)
    return dict(zip(values, (stacked / dist.get_world_size()).tolist()))


def sum_over_ranks(value: float) -> float:
    """A count summed over ranks: the loss denominators of grpo.py's equation (5)."""
    total = torch.tensor(float(value), dtype=torch.float64, device=collective_device())
    dist.all_reduce(total)
    return total.item()


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's (N,) tensor in rank order: (world * N,), on the collective device."""
    values = values.to(collective_device())
    parts = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, values)
    return torch.cat(parts)


def grpo_step(cfg, policy, reference, optimizer, schedule, prompts, samples, rollout, reward_table) -> dict:
    """Advantages, then num_iterations x minibatches clipped policy updates; returns metrics.

    Advantages are computed from every rank's rewards, so "batch" scaling and
    the zero-variance count see the whole step; groups never span ranks.
    """
    rank, world, G = dist.get_rank(), dist.get_world_size(), cfg.num_generations
    N = reward_table.shape[0]
    all_rewards = gather_rows(reward_table.sum(dim=1))  # (world * N,)
    advantages = grpo.group_advantages(all_rewards, G, cfg.scale_rewards)[rank * N:(rank + 1) * N]  # (N,)
    zero_std = reward_table.sum(dim=1).view(-1, G).std(dim=1) == 0  # (B,)

    mask = rollout.completion_mask  # (N, T)
    if cfg.mask_truncated:
        mask = mask * ~rollout.truncated.unsqueeze(1)  # (N, T), truncated rows get no loss
    rows = torch.arange(N)
    if cfg.filter_zero_std:
        rows = rows[~zero_std.repeat_interleave(G)]  # only groups with a reward spread train
    ids, device = rollout.completion_ids, rollout.completion_ids.device

    def logprobs_of(model, group_rows):
        """token_logprobs of whole groups of rows, each group's prompt encoded once."""
        return modellib.token_logprobs(model, data.select_rows(prompts, group_rows[::G] // G), ids[group_rows],
                                       mask[group_rows], cfg.temperature, group_size=G)  # (n, T)

    ref_logprobs = None
    if reference is not None:
        # Only the rows that train; a rank with none still runs the reference once (FSDP collectives).
        ref_rows = rows if len(rows) else torch.arange(G)
        ref_logprobs = torch.zeros_like(rollout.logprobs)  # (N, T)
        with torch.no_grad():
            ref_logprobs[ref_rows] = logprobs_of(reference, ref_rows)

    # With one update per rollout the old policy is the current one: ratio exactly 1.
    # Otherwise it is the policy that sampled, whose log-probs the sampler kept.
    on_policy = cfg.num_iterations == 1 and cfg.minibatches == 1
    metrics = []
    # Minibatch k holds the prompts whose index in the whole step is k modulo the
    # number of minibatches, so each update sees the same rows on any number of ranks.
    prompt_index = rank * (N // G) + rows // G  # (rows,)
    for _ in range(cfg.num_iterations):
        for chunk in [rows[prompt_index % cfg.minibatches == k] for k in range(cfg.minibatches)]:
            # A rank with no rows left still runs one forward and backward (on a group it
            # gives no weight), so every rank makes the same FSDP collective calls.
            weight = torch.ones(len(chunk) or G, 1, device=device)
            if len(chunk) == 0:
                chunk, weight = torch.arange(G), weight * 0
            chunk_mask = mask[chunk] * weight  # (n, T)
            sequences = (chunk_mask.sum(dim=1) > 0).sum().item()
            count = {"grpo": sequences, "dapo": chunk_mask.sum().item(),
                     "dr_grpo": sequences * cfg.max_new_tokens}[cfg.loss_type]
            denominator = max(sum_over_ranks(count), 1) / world  # the ranks' gradients are averaged
            logprobs = logprobs_of(policy, chunk)  # (n, T): chunks hold whole groups
            old = logprobs.detach() if on_policy else rollout.logprobs[chunk]
            loss, chunk_metrics = grpo.policy_loss(
                logprobs, old, None if ref_logprobs is None else ref_logprobs[chunk], advantages[chunk], chunk_mask,
                beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_new_tokens, denominator=denominator)
            chunk_metrics["grad_norm"] = optimizer_step(cfg, policy, optimizer, schedule, loss)
            chunk_metrics["loss"] = loss.item()
            metrics.append(chunk_metrics)
    # Over the minibatch updates: extremes stay extremes, the rest are averaged.
    reduce = {"ratio_min": min, "ratio_max": max, "kl_max": max}
    averaged = {k: reduce.get(k, lambda v: sum(v) / len(v))([m[k] for m in metrics]) for k in metrics[0]}
    return {**averaged, "zero_std_groups": zero_std.float().mean().item(),
            "trained_rows": len(rows) / N, "entropy": rollout.entropy[rollout.completion_mask.bool()].mean().item()}


def optimizer_step(cfg, policy, optimizer, schedule, loss) -> float:
    """Backward, clip, step, schedule; returns the gradient norm before clipping.

    A non-finite loss or gradient skips the update (the caller counts it). The
    norm is over all ranks' shards, so every rank skips alike.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    if torch.isfinite(grad_norm):
        optimizer.step()
    schedule.step()
    return grad_norm.item()


def main():
    import eval as evaluation  # eval.py imports this file; import late to keep the cycle harmless

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never reach for the hub
    device = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = resolve(parse_args(Config), world)
    print0("config:", json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(cfg.seed)

    # ---- processor and data first: bad input stops the run before any model is loaded
    root = dataset_root(cfg)
    path = model_path(cfg, root)
    out = Path(cfg.output_dir)
    resume_from = resume_folder(cfg, out)
    processor = modellib.Processor.from_pretrained(path, max_pixels=cfg.max_pixels)
    tokens = modellib.visual_tokens(processor, cfg.image_size or None)
    print0(f"{tokens} visual tokens per image")
    if cfg.max_pixels and tokens * 28 * 28 > cfg.max_pixels:  # one token covers 28 x 28 pixels
        raise SystemExit(f"the processor makes {tokens} visual tokens per image: more than --max_pixels allows")
    # Every rank walks the same shuffled order and takes its slice of each step's prompts.
    train_samples, held_out = load_data(cfg, root, cfg.train_split, cfg.test_split, cfg.drop_test_images)
    train_samples = [dict(s, mode=cfg.prompt_mode) for s in train_samples]
    check_prompt_lengths(cfg, processor, train_samples + held_out, tokens)
    random.Random(cfg.seed).shuffle(held_out)  # a subset of it keeps the letter balance
    held_out = held_out[:cfg.eval_size or None]
    print0(f"{len(train_samples)} training and {len(held_out)} held-out questions from {root}")
    if cfg.epochs:
        cfg.steps = math.ceil(cfg.epochs * len(train_samples) / cfg.prompts_per_step)
        print0(f"--epochs {cfg.epochs}: {cfg.steps} steps of {cfg.prompts_per_step} prompts")

    # ---- model, reference, optimizer (the reference is always the base, also on resume)
    policy, reference = load_models(cfg, path, device, policy_path=resume_from)
    end_ids = modellib.end_token_ids(policy, processor.tokenizer)
    banned_ids = processor.tokenizer.convert_tokens_to_ids(modellib.VISION_TOKENS)
    updates_per_step = cfg.num_iterations * cfg.minibatches if cfg.algo == "grpo" else 1
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / (cfg.steps * updates_per_step))
    order_rng = torch.Generator().manual_seed(cfg.seed)
    sampling_rng = torch.Generator().manual_seed(cfg.seed + 1)
    order, start_step, base_accuracy, skipped_in_a_row = [], 0, None, 0
    if resume_from:
        state = modellib.load_trainer_state(policy, optimizer, resume_from)
        schedule.load_state_dict(state["schedule"])
        order_rng.set_state(state["order_rng"])
        sampling_rng.set_state(state["sampling_rng"])
        order, start_step, base_accuracy = state["order"].tolist(), state["step"], state["base_accuracy"]
        print0(f"resumed from {resume_from} at step {start_step}" + (
            "" if state["world"] == world else
            f" (saved on {state['world']} ranks, now {world}: correct, but not bit-exact)"))
    B, G = cfg.prompts_per_step // world, cfg.num_generations
    reward_names = cfg.rewards.split(",")
    image_size = cfg.image_size or None
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = open(out / "metrics.jsonl", "a") if rank == 0 else None
    rollouts_file = open(out / "rollouts.jsonl", "a") if rank == 0 else None
    tensorboard, recent = (tensorboard_writer(out) if rank == 0 else None), []

    # Saved with every checkpoint: the config, and what it trained on (eval.py counts test questions seen).
    described = {"train_config.json": dataclasses.asdict(cfg),
                 "training_data.json": data.training_record(train_samples, root)}

    def save(step: int, folder: Path) -> None:
        state = {"step": step, "schedule": schedule.state_dict(), "order": torch.tensor(order, dtype=torch.long),
                 "order_rng": order_rng.get_state(), "sampling_rng": sampling_rng.get_state(),
                 "base_accuracy": base_accuracy, "world": world}
        modellib.save_checkpoint(policy, processor, folder, described, optimizer, state)

    def run_eval(step: int) -> float:
        summary = evaluation.summarize(evaluation.evaluate(policy, processor, held_out, cfg.prompt_mode, device,
                                                           max_new_tokens=cfg.max_new_tokens, image_size=image_size))
        print0(f"step {step}: held-out accuracy {summary['accuracy']:.3f} "
               f"({summary['questions']} questions, parse failures {summary['parse_failures']:.3f})")
        return summary["accuracy"]

    if base_accuracy is None:
        base_accuracy = run_eval(0)
    progress = tqdm(range(start_step + 1, cfg.steps + 1), disable=rank != 0, desc=cfg.algo,
                    initial=start_step, total=cfg.steps)
    for step in progress:
        t0 = time.time()
        while len(order) < cfg.prompts_per_step:
            order += torch.randperm(len(train_samples), generator=order_rng).tolist()
        step_indices, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        samples = [train_samples[i] for i in step_indices[rank * B:(rank + 1) * B]]
        prompts = data.collate(samples, processor, cfg.prompt_mode, image_size).to(device)

        if cfg.algo == "sft":
            # ---- supervised baseline: the gold answer tag is the whole target
            loss = modellib.sft_loss(policy, processor.tokenizer, prompts,
                                     [f"<answer>{s['answer']}</answer>" for s in samples])
            local = {"loss": loss.item(), "grad_norm": optimizer_step(cfg, policy, optimizer, schedule, loss)}
            t_rollout = 0.0
        else:
            # ---- rollout: G completions for each of this rank's B prompts (row i is prompt i // G)
            rollout = modellib.sample(policy, prompts, G, cfg.max_new_tokens, end_ids, banned_ids,
                                      cfg.temperature, cfg.top_p, cfg.top_k, generator=sampling_rng,
                                      rows=(rank * B * G, world * B * G), compile_decode=cfg.compile_decode)
            t_rollout = time.time() - t0
            # ---- rule rewards on the decoded text, then advantages and the policy update
            texts = modellib.decode(processor.tokenizer, rollout)
            row_samples = [s for s in samples for _ in range(G)]
            reward_table = score(texts, row_samples, reward_names)  # (N, R)
            if rank == 0 and cfg.rollouts_every and step % cfg.rollouts_every == 0:
                rollouts_file.write(json.dumps({"step": step, "id": samples[0]["id"], "answer": samples[0]["answer"],
                                                "prompt": data.build_prompt(samples[0], cfg.prompt_mode),
                                                "completions": texts[:G], "rewards": reward_table[:G].tolist()}) + "\n")
                rollouts_file.flush()
            local = grpo_step(cfg, policy, reference, optimizer, schedule, prompts, samples, rollout, reward_table)
            if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
                modellib.sync_reference(policy, reference, cfg.ref_sync_alpha)
            choices = [rewards.extract_choice(t, s["options"]) for t, s in zip(texts, row_samples)]
            local.update({
                "reward": reward_table.sum(dim=1).mean().item(),
                **{f"reward_{n}": reward_table[:, i].mean().item() for i, n in enumerate(reward_names)},
                "completion_len": rollout.completion_mask.sum(dim=1).float().mean().item(),
                "completion_len_max": rollout.completion_mask.sum(dim=1).max().item(),
                "truncated": rollout.truncated.float().mean().item(),
                # The sampled-letter histogram shows a letter dying out (then only the KL revives it).
                **{f"letter_{L}": sum(c == L for c in choices) / len(choices) for L in data.LETTERS},
            })

        # ---- log
        step_s = time.time() - t0
        logged = {"step": step, **mean_over_ranks(local), "lr": schedule.get_last_lr()[0],
                  "rollout_s": t_rollout, "update_s": step_s - t_rollout, "step_s": step_s}
        if "completion_len" in logged:  # sampled completion tokens per second of rollout, all ranks
            logged["tokens_per_s"] = logged["completion_len"] * cfg.prompts_per_step * G / max(t_rollout, 1e-9)
        skipped_in_a_row = 0 if math.isfinite(logged["grad_norm"]) else skipped_in_a_row + 1
        if skipped_in_a_row:
            print0(f"step {step}: non-finite loss or gradient, update skipped ({skipped_in_a_row} in a row)")
        if skipped_in_a_row >= cfg.max_skipped_steps:
            raise SystemExit(f"{skipped_in_a_row} non-finite updates in a row at step {step}: lower --lr, or "
                             "look at the last lines of metrics.jsonl and rollouts.jsonl")
        if rank == 0:
            metrics_file.write(json.dumps(logged) + "\n")
            metrics_file.flush()
            for name, value in logged.items() if tensorboard else ():
                tensorboard.add_scalar(name, value, step)
            progress.set_postfix(loss=f"{logged['loss']:.3f}")
            print0(summary_line(logged))
            recent = (recent + [logged])[-10:]
            if step % 10 == 0:
                warn_if_stuck(recent)
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            save(step, out / f"step-{step}")
            if rank == 0:
                for old in step_checkpoints(out)[:-cfg.keep_checkpoints or None]:
                    shutil.rmtree(old)

    final_accuracy = run_eval(cfg.steps)
    modellib.save_checkpoint(policy, processor, out / "final", described)
    print0(f"held-out accuracy: base {base_accuracy:.3f} -> final {final_accuracy:.3f} "
           f"({(final_accuracy - base_accuracy) * 100:+.1f} points); checkpoint in {out / 'final'}")
    if rank == 0:
        plot_curves(out)
    finish_distributed()


def tensorboard_writer(out: Path):
    """A TensorBoard writer when tensorboard is installed (an optional extra), else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(out / "tensorboard")


def warn_if_stuck(recent: list[dict]) -> None:
    """Warn about the two signatures of a run that learns nothing, over the last few steps."""
    if "truncated" not in recent[-1]:
        return
    truncated = sum(m["truncated"] for m in recent) / len(recent)
    zero_std = sum(m["zero_std_groups"] for m in recent) / len(recent)
    if truncated > 0.5:
        print0(f"warning: {truncated:.0%} of completions hit --max_new_tokens: raise it, or see rollouts.jsonl")
    if zero_std > 0.9:
        print0(f"warning: {zero_std:.0%} of groups have equal rewards, so no policy gradient (fine only if the "
               "reward is at its maximum): raise --num_generations or --temperature, or see rollouts.jsonl")


def pyplot(what: str):
    """matplotlib.pyplot drawing to files, or None (and a note) without matplotlib, an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print0(f"matplotlib is not installed: skipping {what} (pip install matplotlib)")
        return None
    return plt


def plot_curves(out: Path) -> None:
    """curves.png: reward, accuracy and completion length per step (needs matplotlib, an optional extra)."""
    plt = pyplot("curves.png")
    if plt is None:
        return
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    names = [n for n in ("reward", "reward_accuracy", "completion_len", "loss") if n in logged[-1]]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3))
    for ax, name in zip(list(axes) if len(names) > 1 else [axes], names):
        ax.plot([m["step"] for m in logged if name in m], [m[name] for m in logged if name in m])
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)


def step_checkpoints(out: Path) -> list[Path]:
    """The complete step-N checkpoints in out, oldest first (a .tmp folder is an unfinished save)."""
    return sorted((p for p in out.glob("step-*") if p.name.removeprefix("step-").isdigit()),
                  key=lambda p: int(p.name.removeprefix("step-")))


def resume_folder(cfg, out: Path) -> str | None:
    """The checkpoint to resume from: --resume PATH, or with auto the newest step-N (None: start fresh)."""
    if cfg.resume == "auto":
        found = step_checkpoints(out)
        return str(found[-1]) if found else None
    if cfg.resume and not (Path(cfg.resume) / "trainer_state.pt").exists():
        raise SystemExit(f"--resume {cfg.resume}: no trainer_state.pt there; pass a step-N folder or auto")
    return cfg.resume or None


def load_models(cfg, path: str, device, policy_path: str | None = None) -> tuple:
    """The policy (from policy_path when resuming) and, only when beta > 0, a frozen reference from path."""
    policy = modellib.load_model(policy_path or path).to(device)
    if cfg.grad_checkpointing:
        modellib.enable_grad_checkpointing(policy)
    modellib.shard(policy, bf16=cfg.dtype == "bf16", hybrid=cfg.hybrid_shard)
    reference = None
    if cfg.beta != 0 and cfg.algo == "grpo":
        # The reference never trains, so it is stored in the compute dtype (bf16 halves its memory).
        dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32
        reference = modellib.load_model(path, dtype).to(device).requires_grad_(False)
        modellib.shard(reference, bf16=cfg.dtype == "bf16", hybrid=cfg.hybrid_shard)
    return policy, reference


def summary_line(m: dict) -> str:
    """The one-line summary of a step printed under the progress bar."""
    if "reward" not in m:
        return f"step {m['step']} loss {m['loss']:.4f} {m['step_s']:.2f}s"
    letters = " ".join(f"{L}:{m[f'letter_{L}']:.2f}" for L in data.LETTERS)
    return (f"step {m['step']} reward {m['reward']:.3f} format {m.get('reward_format', 0):.2f} "
            f"accuracy {m.get('reward_accuracy', 0):.2f} kl {m['kl']:.4f} len {m['completion_len']:.1f} "
            f"zero-std {m['zero_std_groups']:.2f} letters {letters} {m['step_s']:.2f}s")


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad input: the message names the file and record
        raise SystemExit(f"error: {error}")
