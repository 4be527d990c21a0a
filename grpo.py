"""Group Relative Policy Optimization: the math, as pure functions on tensors.

For each prompt q we sample a group of G completions o_1..o_G from the old
policy pi_old and score each with rule rewards r_i (rewards.py). Then:

(1) Group-relative advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2):
        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)
    std is Bessel-corrected (torch.std's default), as in Med-R1's released
    code and TRL. `scale="batch"` divides by the std of the whole batch
    instead, `scale="none"` does not divide at all (Dr. GRPO, Liu et al. 2025).
    Every token of o_i gets the same A_i. A group whose rewards are all equal
    has A_i = 0 for every i, so it moves no weight through the policy term.

(2) Probability ratio per token t of completion i:
        rho_{i,t} = pi(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    With one update per rollout (Med-R1's setting) pi_old = pi, so rho = 1
    and clipping never acts; the gradient is still that of rho * A.

(3) Clipped surrogate (Schulman et al. 2017, PPO), with DAPO's asymmetric
    range (Yu et al. 2025, "clip-higher"):
        S_{i,t} = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)

(4) KL to the frozen reference pi_ref, the k3 estimator (Schulman 2020,
    "Approximating KL divergence"), unbiased and always >= 0:
        D_{i,t} = pi_ref/pi - log(pi_ref/pi) - 1
                = exp(ref_logp - logp) - (ref_logp - logp) - 1

(5) Loss, minimised, with x_{i,t} = -S_{i,t} + beta * D_{i,t} and |o_i| the
    length of completion i; `loss_type` chooses how tokens are averaged:
      grpo    L = (1/N) sum_i (1/|o_i|) sum_t x_{i,t}
              each sequence's own mean, then the mean over sequences: Med-R1's
              (and the GRPO paper's) choice. A token of a short completion
              weighs more than one of a long completion.
      dapo    L = (1 / sum_i |o_i|) sum_{i,t} x_{i,t}
              every token weighs the same (Yu et al. 2025, DAPO, eq. 8).
      dr_grpo L = (1 / (N * T_max)) sum_{i,t} x_{i,t}
              a constant denominator, T_max the completion length limit, so
              no length bias at all (Liu et al. 2025, "Understanding R1-Zero-
              like training", Dr. GRPO). N counts the completions that have a
              loss: one masked whole (--mask_truncated) or filtered out
              (--filter_zero_std) is in neither sum. TRL's GRPOTrainer divides
              by every completion of the batch, masked or not
              (per_token_loss.size(0) * max_completion_length), so with masked
              rows its loss is smaller than ours by their share; without
              them the two are equal.
    N, sum_i |o_i| are counted over the whole optimizer step: all ranks and all
    pieces of the batch. Each piece passes its share of the denominator in
    (`denominator`: the global count divided by the number of ranks, since the
    ranks' gradients are averaged), so the gradient does not depend on how the
    batch is split.

(6) Zero-variance groups (every reward equal) have A = 0 and give no policy
    gradient, only KL. DAPO's "dynamic sampling" drops them from the update
    (`--filter_zero_std` in train.py); their fraction is always logged.

(7) Several updates per rollout (PPO's epochs; the GRPO paper's mu,
    `--num_iterations`, each over `--minibatches` pieces): pi_old stays the
    policy that sampled, so after the first update rho departs from 1 and the
    clip in (3) acts. Its log-probs are the sampler's in fp32; in bf16 the
    sampler rounds otherwise than the training forward, so a no-grad training
    forward recomputes them before the first update (train.update_policy): the
    first update's rho is then 1 up to the forward's own rounding.

(8) Truncated completions (no end token before the length limit) can be given
    no loss at all, mask_{i,t} = 0 for every t (DAPO's overlong filtering,
    `--mask_truncated`): their reward says nothing about a finished answer.

(9) Reference refresh (TR-DPO, Gorbatovski et al. 2024; TRL's sync_ref_model):
    every K steps pi_ref <- alpha * pi + (1 - alpha) * pi_ref, parameter by
    parameter (`--ref_sync_every K --ref_sync_alpha alpha`).

All log-probs are fp32 and computed with the sampling temperature applied
(model.py), the same way for pi, pi_old and pi_ref.

Shapes: N = B*G completions (each group's G rows contiguous), T completion tokens.
"""

import torch
import torch.distributed as dist


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Equation (1): rewards (N,) -> advantages (N,), normalised within each group of G rows."""
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = grouped - grouped.mean(dim=1, keepdim=True)  # (B, G)
    if scale == "group":
        centered = centered / (grouped.std(dim=1, keepdim=True) + 1e-4)  # (B, G)
    elif scale == "batch":
        centered = centered / (rewards.std() + 1e-4)  # (B, G)
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return centered.view(-1)  # (N,)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Equation (4): per-token k3 estimate of KL(pi || pi_ref), same shape as the inputs."""
    log_ratio = ref_logprobs - logprobs
    return torch.exp(log_ratio) - log_ratio - 1


LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def loss_count(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> int:
    """Equation (5)'s denominator over the completions of mask (N, T): the sequences that have a
    loss (grpo), their tokens (dapo) or those sequences x T_max (dr_grpo)."""
    sequences = (mask.sum(dim=1) > 0).sum().item()
    T_max = max_completion_length or mask.shape[1]
    return {"grpo": sequences, "dapo": mask.sum().item(), "dr_grpo": sequences * T_max}[loss_type]


def global_loss_count(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> float:
    """This piece's share of the whole step's denominator: loss_count summed over every rank's
    piece (a collective under torch.distributed), divided by the number of ranks, whose gradients
    are averaged."""
    count = loss_count(mask, loss_type, max_completion_length)
    total = torch.tensor(float(count), dtype=torch.float64, device=mask.device)
    world = 1
    if dist.is_initialized():
        dist.all_reduce(total)
        world = dist.get_world_size()
    return max(total.item(), 1) / world


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """Equations (2)-(5): the scalar loss and a dict of float metrics.

    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,).
    mask is 1 on completion tokens (up to and including the end token).
    denominator: this piece's share of equation (5)'s denominator; None means
    this batch is the whole step (N, sum_i |o_i| or N * T_max, counted here).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.bool()
    # Padding may hold any value, even inf: it is zeroed before exp, so neither the loss nor
    # the gradient (0 * inf would be NaN) ever sees it.
    logprobs = torch.where(mask, logprobs, 0)  # (N, T)
    ratio = torch.exp(logprobs - torch.where(mask, old_logprobs, 0))  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1), broadcast over tokens
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # (N, T)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # (N, T)
    per_token = -surrogate  # (N, T)
    kl = torch.zeros_like(per_token)
    if beta != 0:
        kl = kl_k3(logprobs, torch.where(mask, ref_logprobs, 0))  # (N, T)
        per_token = per_token + beta * kl
    per_sequence = torch.where(mask, per_token, 0).sum(dim=1)  # (N,)
    if loss_type == "grpo":
        per_sequence = per_sequence / mask.sum(dim=1).clamp(min=1)  # each sequence's own mean
    denominator = denominator or max(loss_count(mask, loss_type, max_completion_length), 1)
    loss = per_sequence.sum() / denominator

    with torch.no_grad():
        n_tokens = max(mask.sum().item(), 1)
        # Where the clipped term is the minimum: below 1 - eps_low with A < 0, above 1 + eps_high
        # with A > 0.
        clipped_low = (ratio < 1 - eps_low) & (adv < 0) & mask  # (N, T)
        clipped_high = (ratio > 1 + eps_high) & (adv > 0) & mask  # (N, T)
        masked_ratio = ratio[mask] if mask.any() else torch.ones(1)
        metrics = {
            "clip_frac": (clipped_low | clipped_high).sum().item() / n_tokens,
            "clip_frac_low": clipped_low.sum().item() / n_tokens,
            "clip_frac_high": clipped_high.sum().item() / n_tokens,
            "kl": torch.where(mask, kl, 0).sum().item() / n_tokens,
            "kl_max": torch.where(mask, kl, 0).max().item(),
            "ratio_min": masked_ratio.min().item(),
            "ratio_max": masked_ratio.max().item(),
        }
    return loss, metrics
