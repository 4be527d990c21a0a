"""GRPO training of Qwen2-VL on medical multiple-choice VQA (Med-R1), one file, top to bottom.

    python train.py                              # embedded tiny model + synthetic data, CPU
    torchrun --nproc_per_node 2 train.py         # the same on two processes (gloo), FSDP2
    torchrun --nproc_per_node 8 train.py --model /models/Qwen2-VL-2B --data /data/OmniMedVQA

Each step: sample G completions per prompt -> score them with rule rewards ->
advantages within each group -> one clipped, KL-regularised policy update
(grpo.py has the equations) -> log -> (sometimes) evaluate and save.

Shapes: B prompts on this rank, G samples per prompt, N = B*G, T completion tokens.
"""

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import common
import data
import eval as evaluation
import grpo
import inputs
import lora
import model as modellib
import rewards
import sampler
import sources
import tiny
from common import print0


@dataclass
class Config:
    """GRPO (or SFT) training of a Qwen2-VL model on OmniMedVQA; every flag is a field here."""

    # what to train
    model: str = ""  # local Hugging Face folder (Qwen2-VL, 2.5-VL, 3-VL); empty = the tiny model
    data: str = ""  # OmniMedVQA root (QA_information/, Images/); empty = synthetic data
    modalities: str = ""  # comma-separated Med-R1 modality names (CT, MRI, ...); empty = all
    question_types: str = ""  # comma-separated; empty = all (synthetic data: Modality Recognition)
    train_split: str = ""  # files to train on (README: your own data); empty = 80/20 of --data
    test_split: str = ""  # held-out files evaluated during training; empty = the 20%
    drop_test_images: bool = True  # no image on both sides; false: only questions (Med-R1's files)
    prompt_mode: Literal[rewards.TRAINING_MODES] = "think-after"  # think-after: answer, then why
    rewards: str = "format,accuracy"  # names in rewards.REWARDS, summed
    reward_weights: str = ""  # comma-separated, one per reward; empty = all 1
    algo: Literal["grpo", "sft"] = "grpo"  # sft: on the gold answer (the baseline)
    sft_format: Literal["answer", "medr1"] = "answer"  # medr1: Med-R1's released SFT (README)
    # GRPO (Med-R1's values; grpo.py has the equations)
    num_generations: int = 8  # G completions per prompt (Med-R1: 4)
    prompts_per_step: int = 16  # prompts per rollout over all ranks (Med-R1: 8)
    beta: float = 0.04  # weight of the KL to the frozen reference; 0 loads no reference
    kl_estimator: Literal[grpo.KL_ESTIMATORS] = "k3"  # the KL's per-token estimate
    eps_low: float = 0.2  # clip range below 1 for the probability ratio
    eps_high: float = 0.2  # clip range above 1 (DAPO's clip-higher uses 0.28)
    loss_type: Literal[grpo.LOSS_TYPES] = "grpo"  # sequence, token mean, constant
    scale_rewards: Literal[grpo.SCALES] = "group"  # advantages / whose std; gdpo: per reward first
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's ratio
    entropy_coef: float = 0.0  # weight of the entropy bonus
    top_entropy_quantile: float = 1.0  # the policy term's share of tokens, highest entropy first
    num_iterations: int = 1  # mu: policy updates per rollout; > 1 makes the ratio depart from 1
    minibatches: int = 1  # each rollout is split into this many optimizer steps, per iteration
    filter_zero_std: bool = False  # drop groups whose rewards are all equal from the update
    mask_truncated: bool = False  # no loss on completions that hit max_new_tokens unfinished
    overlong_buffer: int = 0  # DAPO: the reward falls over the last N tokens (0: off) ...
    overlong_penalty: float = 1.0  # ... linearly, by this much at max_new_tokens
    ref_sync_every: int = 0  # every N steps ref = a * policy + (1 - a) * ref (0: frozen)
    ref_sync_alpha: float = 0.6  # a above
    temperature: float = 1.0  # sampling temperature; log-probs are computed at the same one
    top_p: float = 1.0  # nucleus sampling
    top_k: int = 0  # draw among the k most likely tokens (Med-R1: 50); 0 = all
    max_new_tokens: int = 32  # completion length limit (Med-R1: 256)
    # optimisation
    steps: int = 600  # rollouts (GRPO) or batches (SFT)
    epochs: float = 0  # > 0: steps = epochs x training questions / prompts_per_step
    lr: float = 0.0  # peak lr; 0 = 5e-4 for the tiny model, else 1e-6 (Med-R1's GRPO)
    lr_schedule: Literal["linear", "cosine"] = "linear"  # decay to 0 after the warm-up
    warmup_ratio: float = 0.0  # the lr rises from 0 over this share of the updates
    accumulation_steps: int = 1  # SFT: a step's prompts in this many passes, one update
    weight_decay: float = 0.0  # AdamW weight decay (Med-R1: 0)
    grad_clip: float = 1.0  # max gradient norm
    dtype: Literal["auto", "bf16", "fp32"] = "auto"  # compute; auto: bf16 on CUDA
    decoder: Literal[sampler.DECODERS] = "dynamic"  # static: fixed-shape cache; graph: compiled
    grad_checkpointing: bool = False  # recompute decoder layers in backward: less memory
    # what trains
    lora_rank: int = 0  # > 0: only rank-r adapters on the language model train (LoRA); 0 = all
    lora_alpha: float = 0.0  # the adapters' scale is alpha / rank; 0 = 2 x rank
    freeze_vision_tower: bool = False  # the vision encoder does not train (always, with LoRA)
    freeze_projector: bool = False  # the mergers into the language model do not train (idem)
    hybrid_shard: bool = False  # multi-node: shard within each node, replicate across nodes
    # images
    image_size: int = 384  # images are resized to this square first (Med-R1: 384); 0 = keep
    max_pixels: int = 0  # pixel budget per image; 0 = the processor's own (Med-R1: 401408)
    # bookkeeping
    output_dir: str = "runs/tiny"  # checkpoints, metrics.jsonl, eval results
    cache_dir: str = ".cache"  # the tiny model and synthetic data are built here once
    eval_every: int = 100  # evaluate on held-out questions every N steps (0 = before and after)
    eval_size: int = 320  # held-out questions per evaluation (0 = all)
    save_every: int = 100  # save a resumable checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # keep the newest K step-N checkpoints (final is always kept)
    resume: str = ""  # auto = the newest complete step-N in output_dir (if any); or a folder
    overwrite: bool = False  # replace the run already in output_dir (else: stop, or --resume)
    rollouts_every: int = 10  # write one prompt's completions to rollouts.jsonl every N steps
    report_to: Literal["", "wandb"] = ""  # also log to Weights & Biases
    skip_bad_records: bool = False  # skip (and count) bad records instead of stopping
    seed: int = 0  # data order, sampling and the tiny model's build


# Every number's allowed range, checked in one place (resolve); a Literal field's values too.
LIMITS = {
    **dict.fromkeys(["num_generations", "prompts_per_step", "num_iterations", "minibatches",
                     "max_new_tokens", "steps", "accumulation_steps", "keep_checkpoints"],
                    common.AT_LEAST_1),
    **dict.fromkeys(["beta", "eps_high", "ref_sync_every", "top_k", "epochs", "lr",
                     "weight_decay", "image_size", "max_pixels", "eval_every", "eval_size",
                     "save_every", "rollouts_every", "lora_rank", "lora_alpha", "entropy_coef",
                     "overlong_buffer", "overlong_penalty"], common.AT_LEAST_0),
    **dict.fromkeys(["temperature", "grad_clip"], common.ABOVE_0),
    **dict.fromkeys(["eps_low", "warmup_ratio"], (lambda v: 0 <= v < 1, "in [0, 1)")),
    **dict.fromkeys(["ref_sync_alpha", "top_p", "top_entropy_quantile"],
                    (lambda v: 0 < v <= 1, "in (0, 1]")),
    "modalities": common.names_in(sources.MODALITIES),
    "question_types": common.names_in(sources.QUESTION_TYPES),
    "rewards": common.names_in(rewards.REWARDS), "reward_weights": common.NUMBERS,
}
# Non-finite updates are skipped; this many in a row stop the run.
MAX_SKIPPED_STEPS = 5


def resolve(cfg: Config, world: int) -> Config:
    """Check every flag's range and the cross-field rules once, up front; fill automatic values."""
    common.check_flags(cfg, LIMITS)
    if not cfg.rewards:
        raise SystemExit("--rewards: name at least one reward")
    if cfg.reward_weights and len(cfg.reward_weights.split(",")) != len(cfg.rewards.split(",")):
        raise SystemExit(f"--reward_weights {cfg.reward_weights}: one weight per reward in "
                         f"--rewards {cfg.rewards}")
    if cfg.overlong_buffer >= cfg.max_new_tokens:
        raise SystemExit(f"--overlong_buffer {cfg.overlong_buffer} must be below --max_new_tokens")
    if not cfg.lr:
        cfg.lr = 1e-6 if cfg.model else 5e-4
    if cfg.dtype == "auto":
        cfg.dtype = "bf16" if torch.cuda.is_available() else "fp32"
    if cfg.prompts_per_step % world:
        raise SystemExit(f"--prompts_per_step {cfg.prompts_per_step} must be a multiple of the "
                         f"{world} ranks")
    if cfg.num_generations < 2 and cfg.algo == "grpo":
        raise SystemExit("--num_generations must be at least 2: advantages are relative to a group")
    if cfg.ref_sync_every and not (cfg.beta > 0 and cfg.algo == "grpo"):
        raise SystemExit("--ref_sync_every needs a reference: --beta above 0 and --algo grpo")
    if cfg.ref_sync_every and cfg.lora_rank:
        raise SystemExit("--ref_sync_every needs a reference of its own: with --lora_rank the "
                         "reference is the base model (the adapters switched off)")
    if cfg.lora_rank:
        cfg.lora_alpha = cfg.lora_alpha or 2 * cfg.lora_rank
        cfg.freeze_vision_tower = cfg.freeze_projector = True
    if cfg.algo == "grpo" and (cfg.sft_format != "answer" or cfg.accumulation_steps > 1):
        raise SystemExit("--sft_format and --accumulation_steps are --algo sft's (GRPO's "
                         "updates are split by --minibatches)")
    if cfg.minibatches > cfg.prompts_per_step:
        raise SystemExit(f"--minibatches {cfg.minibatches} exceeds --prompts_per_step "
                         f"{cfg.prompts_per_step}")
    return cfg


def grpo_iteration(cfg, policy, reference, optimizer, schedule, processor, samples: list[dict],
                   decoding: sampler.Decoding, generator: torch.Generator) -> tuple[dict, dict]:
    """One GRPO step on this rank's B prompts: rollout -> rewards -> advantages and updates.
    Returns the metrics, and the first prompt's completions and rewards (rollouts.jsonl)."""
    rank, world, G = dist.get_rank(), dist.get_world_size(), cfg.num_generations
    start = time.time()
    prompts = data.collate(samples, processor, cfg.prompt_mode, cfg.image_size)
    prompts = prompts.to(common.collective_device())
    # Rollout: G completions for each of this rank's B prompts (row i is prompt i // G).
    N = len(samples) * G
    rollout = sampler.sample(policy, prompts, G, decoding, generator=generator,
                             rows=(rank * N, world * N), decoder=cfg.decoder)
    rollout_s = time.time() - start
    # Rule rewards on the decoded text, then the policy update.
    texts = sampler.decode(processor.tokenizer, rollout)
    row_samples = [s for s in samples for _ in range(G)]
    names = cfg.rewards.split(",")
    reward_table = torch.tensor(rewards.score(texts, row_samples, names, cfg.prompt_mode))  # (N, R)
    lengths = rollout.completion_mask.sum(dim=1).float()  # (N,)
    if cfg.overlong_buffer:
        names = [*names, "overlong"]
        overlong = [rewards.overlong_penalty(n, cfg.max_new_tokens, cfg.overlong_buffer,
                                             cfg.overlong_penalty) for n in lengths.tolist()]
        reward_table = torch.cat([reward_table, torch.tensor(overlong)[:, None]], 1)  # (N, R + 1)
    metrics = update_policy(cfg, policy, reference, optimizer, schedule, prompts, rollout,
                            reward_table)
    # The sampled-letter histogram shows a letter dying out (then only the KL revives it).
    choices = [rewards.extract_choice(t, s["options"]) for t, s in zip(texts, row_samples)]
    metrics.update({
        **{f"reward_{name}": reward_table[:, i].mean().item() for i, name in enumerate(names)},
        "completion_len": lengths.mean().item(), "completion_len_max": lengths.max().item(),
        "truncated": rollout.truncated.float().mean().item(),
        **{f"letter_{L}": sum(c == L for c in choices) / len(choices) for L in sources.LETTERS},
        "rollout_s": rollout_s,
    })
    example = {"id": samples[0]["id"], "answer": samples[0]["answer"],
               "prompt": data.build_prompt(samples[0], cfg.prompt_mode), "completions": texts[:G],
               "rewards": reward_table[:G].tolist()}
    return metrics, example


def update_policy(cfg, policy, reference, optimizer, schedule, prompts, rollout,
                  reward_table) -> dict:
    """Advantages from every rank's rewards (so "batch" scaling and the zero-variance count see
    the whole step; groups never span ranks), then num_iterations x minibatches clipped updates.
    Returns this rank's metrics (reduced over ranks by common.reduce_over_ranks)."""
    rank, G = dist.get_rank(), cfg.num_generations
    N, R = reward_table.shape
    # --reward_weights (else 1 each), and 1 for the overlong term if there is one.
    given = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else []
    weights = torch.tensor(given + [1.0] * (R - len(given)))  # (R,)
    all_rewards = common.gather_rows(reward_table)  # (world * N, R)
    advantages = grpo.weighted_advantages(all_rewards, weights.to(all_rewards.device), G,
                                          cfg.scale_rewards)  # (world * N,)
    advantages = advantages[rank * N:(rank + 1) * N]  # (N,)
    zero_std = grpo.equal_reward_groups(reward_table, weights, G, cfg.scale_rewards)  # (B,)

    mask = rollout.completion_mask  # (N, T)
    if cfg.mask_truncated:
        mask = mask * ~rollout.truncated.unsqueeze(1)  # (N, T), none on truncated rows
    rows = torch.arange(N)
    if cfg.filter_zero_std:
        # Only groups with a reward spread train.
        rows = rows[~zero_std.repeat_interleave(G)]

    def logprobs_of(model, group_rows, with_entropy=False):
        """token_logprobs of whole groups of rows, each group's prompt encoded once: (n, T), and
        with_entropy the entropy (n, T), else None."""
        group_prompts = inputs.select_rows(prompts, group_rows[::G] // G)
        out = modellib.token_logprobs(model, group_prompts, rollout.completion_ids[group_rows],
                                      mask[group_rows], cfg.temperature, G, with_entropy)
        return out if with_entropy else (out, None)

    # Minibatch k holds the prompts whose index in the whole step is k modulo the
    # number of minibatches, so each update sees the same rows on any number of ranks.
    prompt_index = rank * (N // G) + rows // G  # (rows,)
    chunks = [common.rows_or_stand_in(rows[prompt_index % cfg.minibatches == k], G)
              for k in range(cfg.minibatches)]
    entropy_mask = None
    if cfg.top_entropy_quantile < 1:
        trained = torch.zeros_like(mask)  # (N, T)
        trained[rows] = mask[rows]
        entropy_mask = grpo.top_entropy_mask(rollout.entropy, trained, cfg.top_entropy_quantile)

    ref_logprobs = None
    if reference is not None:
        # Every row that trains, in one forward.
        ref_rows, _ = common.rows_or_stand_in(rows, G)
        ref_logprobs = torch.zeros_like(rollout.logprobs)  # (N, T)
        with torch.no_grad(), lora.adapters_off(reference):
            ref_logprobs[ref_rows] = logprobs_of(reference, ref_rows)[0]

    # With one update per rollout the old policy is the current one: ratio exactly 1. Else the
    # training forward recomputes the sampler's log-probs, without gradients, before the first
    # update (equal in fp32, tested; in bf16 they round differently: other shapes, kernels).
    # Either way the first forward of each chunk, before any update, measures that gap.
    on_policy = cfg.num_iterations == 1 and cfg.minibatches == 1
    old_logprobs, gaps = rollout.logprobs.clone(), [None] * len(chunks)  # (N, T)
    if not on_policy:
        with torch.no_grad():
            for k, (chunk, weight) in enumerate(chunks):
                recomputed = logprobs_of(policy, chunk)[0]  # (n, T)
                gaps[k] = grpo.sampler_gap(recomputed, rollout.logprobs[chunk],
                                           mask[chunk] * weight, cfg.eps_low, cfg.eps_high)
                if weight:
                    old_logprobs[chunk] = recomputed
    updates = []
    for _ in range(cfg.num_iterations):
        for k, (chunk, weight) in enumerate(chunks):
            chunk_mask = mask[chunk] * weight  # (n, T)
            denominator = grpo.global_loss_count(chunk_mask, cfg.loss_type, cfg.max_new_tokens)
            # (n, T) each, or None for the entropy: chunks hold whole groups
            logprobs, entropy = logprobs_of(policy, chunk, with_entropy=cfg.entropy_coef != 0)
            gaps[k] = gaps[k] or grpo.sampler_gap(logprobs, rollout.logprobs[chunk], chunk_mask,
                                                  cfg.eps_low, cfg.eps_high)
            old = logprobs.detach() if on_policy else old_logprobs[chunk]
            ref = None if ref_logprobs is None else ref_logprobs[chunk]
            loss, metrics = grpo.policy_loss(
                logprobs, old, ref, advantages[chunk], chunk_mask, beta=cfg.beta,
                eps_low=cfg.eps_low, eps_high=cfg.eps_high, loss_type=cfg.loss_type,
                max_completion_length=cfg.max_new_tokens, denominator=denominator,
                kl_estimator=cfg.kl_estimator, entropy=entropy, entropy_coef=cfg.entropy_coef,
                importance_sampling_level=cfg.importance_sampling_level,
                entropy_mask=None if entropy_mask is None else entropy_mask[chunk])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            metrics["grad_norm"] = optimizer_step(cfg, policy, optimizer, schedule)
            metrics["loss"] = loss.item()
            # Each of the chunk's updates reports its gap, so the step's is the tokens' mean.
            updates.append(({**metrics, **gaps[k]}, chunk_mask.sum().item()))
    return {**common.update_sums(updates), "reward": (reward_table * weights).sum(1).mean().item(),
            "zero_std_groups": zero_std.float().mean().item(), "trained_rows": len(rows) / N,
            "entropy": rollout.entropy[rollout.completion_mask.bool()].mean().item()}


def sft_iteration(cfg, policy, optimizer, schedule, processor, samples: list[dict]) -> tuple:
    """One step of the supervised baseline, its prompts in accumulation_steps passes: on the
    gold answer tag after our prompt (sft_format answer), or Med-R1's released SFT (medr1)."""
    device = common.collective_device()
    optimizer.zero_grad(set_to_none=True)
    nll, count, passes = 0.0, 0, min(cfg.accumulation_steps, len(samples))
    for k in range(passes):
        piece = samples[k::passes]
        if cfg.sft_format == "medr1":
            batch, loss_mask = data.medr1_sft_batch(piece, processor, cfg.image_size)
            piece_nll, piece_count = modellib.sequence_nll(policy, batch.to(device),
                                                           loss_mask.to(device))
        else:
            prompts = data.collate(piece, processor, cfg.prompt_mode, cfg.image_size)
            targets = [f"<answer>{s['answer']}</answer>" for s in piece]
            piece_nll, piece_count = modellib.sft_nll(policy, processor.tokenizer,
                                                      prompts.to(device), targets)
        # Gradients add up over the passes.
        piece_nll.backward()
        nll, count = nll + piece_nll.item(), count + piece_count
    # Targets differ in length from rank to rank, and FSDP averages the ranks' gradients: over
    # the mean count per rank, the gradient is that of the mean over every rank's tokens.
    mean_count = common.reduce_over_ranks({"count": count})["count"]
    for param in policy.parameters():
        if param.grad is not None:
            param.grad /= mean_count
    grad_norm = optimizer_step(cfg, policy, optimizer, schedule)
    return {"loss": nll / mean_count, "grad_norm": grad_norm}, None


def optimizer_step(cfg, policy, optimizer, schedule) -> float:
    """Clip the gradients, step, schedule; returns the gradient norm before clipping.

    A non-finite loss or gradient skips the update (the caller counts it). The
    norm is over all ranks' shards, so every rank skips alike.
    """
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
    # A zero gradient (no row trained) skips too: AdamW's momentum would still move the weights.
    if torch.isfinite(grad_norm) and grad_norm > 0:
        optimizer.step()
    schedule.step()
    return grad_norm.item()


def main():
    cfg = common.parse_args(Config)
    device = common.setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    resolve(cfg, world)
    torch.manual_seed(cfg.seed)

    # ---- data and processor first: bad input stops the run before any model is loaded
    root = tiny.dataset_root(cfg.data, cfg.cache_dir)
    # The synthetic default's question-type filter applies only when no data is named.
    modalities, question_types = tiny.filters(cfg.data or cfg.train_split or cfg.test_split,
                                              cfg.modalities, cfg.question_types)
    train_samples, held_out = data.load_splits(
        root, modalities, question_types, cfg.train_split, cfg.test_split, cfg.drop_test_images,
        cfg.skip_bad_records, cfg.cache_dir, log=print0)
    path = tiny.model_path(cfg.model, cfg.cache_dir, root)
    out = Path(cfg.output_dir)
    resume_from = checkpoint.resume_folder(cfg.resume, out)
    checkpoint.claim(out, cfg.resume, cfg.overwrite)
    processor = inputs.Processor.from_pretrained(path, max_pixels=cfg.max_pixels)
    tokens = data.check_prompts(train_samples + held_out, processor, cfg.prompt_mode,
                                cfg.image_size, cfg.max_pixels, modellib.max_positions(path),
                                cfg.max_new_tokens)
    held_out = data.subset(held_out, cfg.eval_size, cfg.seed)
    if cfg.epochs:
        cfg.steps = math.ceil(cfg.epochs * len(train_samples) / cfg.prompts_per_step)
        print0(f"--epochs {cfg.epochs}: {cfg.steps} steps of {cfg.prompts_per_step} prompts")
    print0("config:", json.dumps(dataclasses.asdict(cfg)))
    print0(f"{len(train_samples)} training and {len(held_out)} held-out questions from {root}; "
           f"{tokens} visual tokens per image")

    # ---- model, reference (the base; a refreshed one comes back on resume), optimizer, schedule
    policy, reference = modellib.load_models(cfg, path, device, policy_path=resume_from)
    decoding = sampler.decoding_for(policy, processor.tokenizer, cfg.max_new_tokens,
                                    cfg.temperature, cfg.top_p, cfg.top_k)
    updates_per_step = cfg.num_iterations * cfg.minibatches if cfg.algo == "grpo" else 1
    trained = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: common.lr_factor(
        k, cfg.steps * updates_per_step, cfg.lr_schedule, cfg.warmup_ratio))
    # Every rank walks the same shuffled order and takes its slice of each step's prompts.
    order_rng = torch.Generator().manual_seed(cfg.seed)
    sampling_rng = torch.Generator().manual_seed(cfg.seed + 1)
    rngs = {"order_rng": order_rng, "sampling_rng": sampling_rng}
    order, start_step, base_accuracy, skipped_in_a_row = [], 0, None, 0
    if resume_from:
        order, start_step, base_accuracy = checkpoint.resume(
            resume_from, policy, optimizer, reference, schedule, rngs,
            dataclasses.asdict(cfg), train_samples)
    # Saved with every checkpoint: the config, and what it trained on (eval.py's seen counts).
    described = {"train_config.json": dataclasses.asdict(cfg),
                 "training_data.json": data.training_record(train_samples, root)}
    checkpoint.truncate_logs(out, start_step)
    log = common.Log(out, cfg.rewards.split(","),
                     dataclasses.asdict(cfg) if cfg.report_to == "wandb" else None)

    def save(step: int, folder: Path) -> None:
        state = {"step": step, "schedule": schedule.state_dict(), "world": world,
                 "training_data": checkpoint.fingerprint(train_samples),
                 "order": torch.tensor(order, dtype=torch.long), "base_accuracy": base_accuracy,
                 **{name: rng.get_state() for name, rng in rngs.items()}}
        # A refreshed reference is saved too: it is no longer the base model.
        checkpoint.save(policy, processor, folder, described, optimizer, state,
                        reference if cfg.ref_sync_every else None)

    def held_out_accuracy(step: int) -> float:
        with common.named_step(step):
            return evaluation.held_out_accuracy(step, policy, processor, held_out, cfg.prompt_mode,
                                                device, cfg.max_new_tokens, cfg.image_size,
                                                cfg.decoder)

    if base_accuracy is None:
        base_accuracy = held_out_accuracy(0)
    B = cfg.prompts_per_step // world
    progress = tqdm(range(start_step + 1, cfg.steps + 1), disable=rank != 0, desc=cfg.algo,
                    initial=start_step, total=cfg.steps)
    for step in progress:
        start = time.time()
        # ---- this rank's slice of the step's prompts
        while len(order) < cfg.prompts_per_step:
            order += torch.randperm(len(train_samples), generator=order_rng).tolist()
        step_indices, order = order[:cfg.prompts_per_step], order[cfg.prompts_per_step:]
        samples = [train_samples[i] for i in step_indices[rank * B:(rank + 1) * B]]

        # ---- one iteration: rollout, rewards, update (or the supervised baseline's step)
        lr = schedule.get_last_lr()[0]  # this step's (first update's) learning rate
        if cfg.algo == "sft":
            metrics, example = sft_iteration(cfg, policy, optimizer, schedule, processor, samples)
        else:
            with common.named_step(step):
                metrics, example = grpo_iteration(cfg, policy, reference, optimizer, schedule,
                                                  processor, samples, decoding, sampling_rng)
            if cfg.ref_sync_every and step % cfg.ref_sync_every == 0:
                modellib.sync_reference(policy, reference, cfg.ref_sync_alpha)

        # ---- log
        logged = log.step(step, metrics, time.time() - start, lr,
                          cfg.prompts_per_step * cfg.num_generations)
        if example and cfg.rollouts_every and step % cfg.rollouts_every == 0:
            log.write("rollouts", {"step": step, **example})
        progress.set_postfix(loss=f"{logged['loss']:.3f}")
        skipped_in_a_row = 0 if math.isfinite(logged["grad_norm"]) else skipped_in_a_row + 1
        if skipped_in_a_row >= MAX_SKIPPED_STEPS:
            raise SystemExit(f"{skipped_in_a_row} non-finite updates in a row at step {step}: "
                             "lower --lr, or read the end of metrics.jsonl and rollouts.jsonl")

        # ---- evaluate, save
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            held_out_accuracy(step)
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            save(step, out / f"step-{step}")
            checkpoint.prune(out, cfg.keep_checkpoints)

    final_accuracy = held_out_accuracy(cfg.steps)
    checkpoint.save(policy, processor, out / "final", described)
    print0(f"held-out accuracy: base {base_accuracy:.3f} -> final {final_accuracy:.3f} "
           f"({(final_accuracy - base_accuracy) * 100:+.1f} points); checkpoint in {out / 'final'}")
    log.finish()
    common.finish_distributed()


if __name__ == "__main__":
    try:
        main()
    except data.DataError as error:  # bad input: the message names the file and record
        raise SystemExit(f"error: {error}")
