"""Group Relative Policy Optimization: the math, as pure functions on tensors.

For each prompt q we sample a group of G completions o_1..o_G from the old
policy pi_old and score each with rule rewards r_{i,1..K} (rewards.py). Then:

(1) Group-relative advantage (Shao et al. 2024, DeepSeekMath, sec. 4.1.2), on
    r_i = sum_k w_k r_{i,k} (`--reward_weights` w, all 1 by default):
        A_i = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)
    std is Bessel-corrected (torch.std's default), as in Med-R1's released
    code and TRL. `scale="batch"` divides by the std of the whole batch
    instead, `scale="none"` does not divide at all (Dr. GRPO, Liu et al. 2025).
    `scale="gdpo"` normalises each reward within its group before the sum, so
    that one reward's spread cannot drown another's (GDPO, Liu et al. 2026,
    arXiv:2601.05242; TRL's multi_objective_aggregation="normalize_then_sum"):
        Z_i = sum_k w_k (r_{i,k} - mean_g(r_k)) / (std_g(r_k) + 1e-4),
        A_i = Z_i / (std(Z over the batch) + 1e-4)
    Z's batch mean is already 0 (each group's centred values sum to 0), so
    unlike TRL we do not subtract it: a group whose rewards are all equal keeps
    A_i = 0, not minus the mean's rounding. verl's GDPO differs more: 1e-6 in
    place of 1e-4, and a token-weighted batch mean and variance.
    Every token of o_i gets the same A_i. A group whose rewards are all equal
    has A_i = 0 for every i, so it moves no weight through the policy term.

(2) Probability ratio per token t of completion i:
        rho_{i,t} = pi(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})
    With one update per rollout (Med-R1's setting) pi_old = pi, so rho = 1
    and clipping never acts; the gradient is still that of rho * A.
    `importance_sampling_level="sequence"` uses GSPO's one ratio per
    completion, the geometric mean of its tokens' (Zheng et al. 2025, eq. 7;
    TRL's importance_sampling_level="sequence"):
        s_i = exp((1/|o_i|) sum_t log rho_{i,t}),   rho_{i,t} := s_i for every t
    GSPO's paper recommends a clip range near 3e-4 / 4e-4 for it. Its
    GSPO-token variant, s_{i,t} = sg[s_i] * pi(o_{i,t}) / sg[pi(o_{i,t})] (sg:
    no gradient; verl's loss mode "gspo"), has the same value and gradient
    when every token of o_i has the same advantage, as here, so it is not a
    switch of its own (tested). verl also caps log s_i at 10; we do not.

(3) Clipped surrogate (Schulman et al. 2017, PPO), with DAPO's asymmetric
    range (Yu et al. 2025, "clip-higher"):
        S_{i,t} = min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i)
    verl also clamps log rho to [-20, 20] and, by default, bounds -S at 3 |A_i|
    when A_i < 0 ("dual clip"); we do neither.

(4) KL to the frozen reference pi_ref, per token, with log r = ref_logp - logp
    (r = pi_ref / pi; Schulman 2020, "Approximating KL divergence"):
        k1 = -log r            k2 = (log r)^2 / 2            k3 = r - log r - 1
    k3, the default (Med-R1's, TRL's), is unbiased and always >= 0. As a loss
    term differentiated on samples of pi, their gradients differ (Tang & Munos
    2025, "On a few pitfalls in KL divergence gradient estimation for RL"):
    k1's is 0 in expectation (E_pi[grad log pi] = 0); k2's is the gradient of
    KL(pi || pi_ref); k3's that of the reverse direction, KL(pi_ref || pi).
    verl clamps log r to [-20, 20] and k3 to [-10, 10] ("low_var_kl"); we do
    not clamp: padding is zeroed before exp, and a k3 of 10 is a diverged run.

(5) Entropy: H_{i,t} is the entropy of the policy's tempered next-token
    distribution at token t. `--entropy_coef c` subtracts c * H_{i,t} from
    each token's loss, averaged as the loss is (verl's entropy_coeff with its
    agg_loss; TRL instead takes the token mean whatever the loss type). With
    `--top_entropy_quantile rho` < 1 only the share rho of tokens with the
    highest entropy keep the policy and entropy terms (Wang et al. 2025,
    "Beyond the 80/20 rule"; TRL's top_entropy_quantile), M_{i,t} = 1 where
    H >= the (1 - rho) quantile; the KL acts on every token, as in TRL (whose
    bonus is then a mean over the kept tokens, ours over all of them). The
    quantile is taken over the step's trained tokens on every rank, from the
    sampler's entropies (the training forward's, tested in fp32), so the mask
    is the same on any number of ranks and minibatches and for each of the
    num_iterations updates; TRL takes it per micro-batch from the training
    forward.

(6) Loss, minimised, with x_{i,t} = -M_{i,t} (S_{i,t} + c H_{i,t}) + beta * D_{i,t}
    (D the chosen KL estimate, M = 1 without the entropy mask) and |o_i| the
    length of completion i; `loss_type` chooses how tokens are averaged:
      grpo    L = (1/N) sum_i (1/|o_i|) sum_t x_{i,t}
              each sequence's own mean, then the mean over sequences: Med-R1's
              (and the GRPO paper's) choice. A token of a short completion
              weighs more than one of a long completion. N counts the
              sequences with a loss, as verl (which adds 1e-8 to |o_i|); TRL
              and EasyR1 divide by every row, masked or not.
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

(7) Zero-variance groups (every reward equal) have A = 0 and give no policy
    gradient, only KL. DAPO's "dynamic sampling" drops them from the update
    (`--filter_zero_std` in train.py); their fraction is always logged.

(8) Several updates per rollout (PPO's epochs; the GRPO paper's mu,
    `--num_iterations`, each over `--minibatches` pieces): pi_old stays the
    policy that sampled, so after the first update rho departs from 1 and the
    clip in (3) acts. Its log-probs are recomputed by a no-grad training
    forward before the first update (train.update_policy), so that the first
    update's rho is 1 up to that forward's own rounding. The sampler is the
    training model's own code, so its log-probs equal the training forward's
    in fp32 (tested); in bf16 they round otherwise (other shapes, kernels).
    Every step logs that gap, measured on the first forward of each row before
    any update (`sampler_gap`): the mean and max |log pi - log pi_sampler|
    and the share of tokens whose ratio pi / pi_sampler it alone would clip.

(9) Length. Truncated completions (no end token before the length limit) can
    be given no loss at all, mask_{i,t} = 0 for every t (DAPO's overlong
    filtering, `--mask_truncated`): their reward says nothing about a
    finished answer. Or DAPO's soft overlong punishment (eq. 13) adds a reward
    term that falls linearly from 0 to -penalty over the last `buffer` tokens
    before the limit (rewards.overlong_penalty; `--overlong_buffer`).

(10) Reference refresh (TR-DPO, Gorbatovski et al. 2024; TRL's sync_ref_model):
    every K steps pi_ref <- alpha * pi + (1 - alpha) * pi_ref, parameter by
    parameter (`--ref_sync_every K --ref_sync_alpha alpha`).

All log-probs are fp32 and computed with the sampling temperature applied
(model.py), the same way for pi, pi_old and pi_ref.

Shapes: N = B*G completions (each group's G rows contiguous), T completion
tokens, R rewards.
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


# How advantages are scaled: by the group's std, the batch's, not at all, or GDPO's.
SCALES = ("group", "batch", "none", "gdpo")


def weighted_advantages(reward_table: torch.Tensor, weights: torch.Tensor, group_size: int,
                        scale: str = "group") -> torch.Tensor:
    """Equation (1) for several rewards: reward_table (N, R) and weights (R,) -> advantages (N,);
    scale "gdpo" normalises each reward within its group first."""
    if scale != "gdpo":
        return group_advantages((reward_table * weights).sum(dim=1), group_size, scale)
    each = torch.stack([group_advantages(column, group_size) for column in reward_table.T],
                       dim=1)  # (N, R)
    summed = (each * weights).sum(dim=1)  # (N,)
    return summed / (summed.std() + 1e-4)  # (N,)


def equal_reward_groups(reward_table: torch.Tensor, weights: torch.Tensor, group_size: int,
                        scale: str = "group") -> torch.Tensor:
    """Equation (7): which groups (B,) have advantages all 0: equal weighted sums (under "gdpo",
    every reward equal)."""
    values = reward_table if scale == "gdpo" else (reward_table * weights).sum(1, keepdim=True)
    grouped = values.view(-1, group_size, values.shape[1])  # (B, G, R) or (B, G, 1)
    return (grouped == grouped[:, :1]).flatten(1).all(dim=1)  # (B,)


KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                estimator: str = "k3") -> torch.Tensor:
    """Equation (4): a per-token estimate of KL(pi || pi_ref), same shape as the inputs."""
    log_r = ref_logprobs - logprobs  # log pi_ref / pi
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return log_r**2 / 2
    if estimator == "k3":
        return torch.exp(log_r) - log_r - 1
    raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, keep: float) -> torch.Tensor:
    """Equation (5)'s M: the tokens of mask (N, T) whose entropy is at least the (1 - keep)
    quantile of every rank's tokens of mask (a collective under torch.distributed): (N, T)."""
    values = entropy[mask.bool()].float().cpu()  # (tokens,)
    if dist.is_initialized():
        # Ranks hold different numbers of tokens.
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, values)
        values = torch.cat(everyone)  # (tokens on every rank,)
    if not len(values):
        return mask.bool()
    threshold = torch.quantile(values, 1 - keep).item()
    return mask.bool() & (entropy >= threshold)


LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def loss_count(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> int:
    """Equation (6)'s denominator over the completions of mask (N, T): the sequences that have a
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
    kl_estimator: str = "k3",
    importance_sampling_level: str = "token",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Equations (2)-(6): the scalar loss and a dict of float metrics.

    logprobs, old_logprobs, ref_logprobs, mask: (N, T); advantages: (N,).
    mask is 1 on completion tokens (up to and including the end token).
    denominator: this piece's share of equation (6)'s denominator; None means
    this batch is the whole step (N, sum_i |o_i| or N * T_max, counted here).
    entropy (N, T): the policy's H, needed when entropy_coef is not 0;
    entropy_mask (N, T): M, the tokens that keep the policy and entropy terms.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    mask = mask.bool()
    # Padding may hold any value, even inf: it is zeroed before exp, so neither the loss nor
    # the gradient (0 * inf would be NaN) ever sees it.
    logprobs = torch.where(mask, logprobs, 0)  # (N, T)
    log_ratio = logprobs - torch.where(mask, old_logprobs, 0)  # (N, T)
    if importance_sampling_level == "sequence":
        # GSPO: the mean log-ratio over the completion's tokens, one ratio for all of them.
        lengths = mask.sum(dim=1, keepdim=True).clamp(min=1)  # (N, 1)
        log_ratio = (log_ratio.sum(dim=1, keepdim=True) / lengths).expand_as(mask)  # (N, T)
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                         f"{importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)  # (N, T)
    adv = advantages.unsqueeze(1)  # (N, 1), broadcast over tokens
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # (N, T)
    policy_term = torch.minimum(ratio * adv, clipped_ratio * adv)  # (N, T)
    if entropy_coef != 0:
        policy_term = policy_term + entropy_coef * torch.where(mask, entropy, 0)  # (N, T)
    if entropy_mask is not None:
        policy_term = policy_term * entropy_mask  # (N, T)
    per_token = -policy_term  # (N, T)
    kl = torch.zeros_like(per_token)
    if beta != 0:
        kl = kl_estimate(logprobs, torch.where(mask, ref_logprobs, 0), kl_estimator)  # (N, T)
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


def sampler_gap(logprobs: torch.Tensor, sampler_logprobs: torch.Tensor, mask: torch.Tensor,
                eps_low: float, eps_high: float) -> dict:
    """Equation (8)'s check, on the tokens of mask (N, T): the mean and max |log pi - log
    pi_sampler| and the share of tokens whose ratio pi / pi_sampler it alone would clip."""
    mask = mask.bool()
    gap = torch.where(mask, logprobs.detach() - sampler_logprobs, 0)  # (N, T)
    ratio = gap.exp()  # (N, T)
    clipped = ((ratio < 1 - eps_low) | (ratio > 1 + eps_high)) & mask  # (N, T)
    n_tokens = max(mask.sum().item(), 1)
    return {"logprob_gap": gap.abs().sum().item() / n_tokens,
            "logprob_gap_max": gap.abs().max().item(),
            "gap_clip_frac": clipped.sum().item() / n_tokens}
