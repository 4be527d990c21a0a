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

(5) Loss, minimised:
        L = mean_i [ (1/|o_i|) sum_t ( -S_{i,t} + beta * D_{i,t} ) ]
    averaged over each sequence's own tokens, then over sequences: Med-R1's
    (and the original GRPO paper's) choice. Long and short completions thus
    weigh the same per sequence, so a token of a short one weighs more.

All log-probs are fp32 and computed with the sampling temperature applied
(model.py), the same way for pi, pi_old and pi_ref.

Shapes: N = B*G completions (each group's G rows contiguous), T completion tokens.
"""

import torch


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
) -> tuple[torch.Tensor, dict]:
    """Equations (2)-(5): the scalar loss and a dict of float metrics.

    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,).
    mask is 1 on completion tokens (up to and including the end token).
    """
    if loss_type != "grpo":
        raise ValueError(f"loss_type must be 'grpo', got {loss_type!r}")
    mask = mask.bool()
    ratio = torch.exp(logprobs - old_logprobs)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1), broadcast over tokens
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # (N, T)
    surrogate = torch.minimum(ratio * adv, clipped_ratio * adv)  # (N, T)
    per_token = -surrogate  # (N, T)
    kl = torch.zeros_like(per_token)
    if beta != 0:
        kl = kl_k3(logprobs, ref_logprobs)  # (N, T)
        per_token = per_token + beta * kl
    # Mean over each sequence's own tokens, then over sequences (equation 5).
    # torch.where, not a product: padding may hold any value, even inf.
    lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
    loss = (torch.where(mask, per_token, 0).sum(dim=1) / lengths).mean()

    with torch.no_grad():
        n_tokens = max(mask.sum().item(), 1)
        clipped = ratio * adv != surrogate  # (N, T): where the clipped term was the minimum
        metrics = {
            "clip_frac": (clipped & mask).sum().item() / n_tokens,
            "kl": torch.where(mask, kl, 0).sum().item() / n_tokens,
        }
    return loss, metrics
