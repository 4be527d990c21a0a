"""The second oracle: grpo.py against the published formulas of verl, TRL and EasyR1.

Each test feeds the same float64 inputs through our function and through a peer's formula,
written out below as plain torch equations (read from the peer, not copied: one short helper per
peer function, its comment naming the repository, file, function and version). Values and, where
the peer's loss is differentiable, gradients agree to ~1e-12. Read:
  verl 0.9.1 (PyPI wheel): verl/trainer/ppo/core_algos.py (kl_penalty_forward, agg_loss,
    compute_policy_loss_vanilla, compute_policy_loss_gspo, compute_gdpo_outcome_advantage) and
    verl/workers/utils/losses.py (ppo_loss: how the entropy and KL terms join the loss);
  TRL 1.16.0 (PyPI wheel): trl/trainer/grpo_trainer.py (_generate_and_score_completions'
    multi_objective_aggregation, _compute_loss, get_high_entropy_mask), trl/trainer/utils.py
    (nanstd, Bessel-corrected);
  EasyR1 at commit 2a319e3 (hiyouga/EasyR1): verl/trainer/core_algos.py (compute_policy_loss
    with loss_type "gspo", average_loss).

Differences, each asserted by a test below rather than hidden by a tolerance:
  - verl's low_var_kl clamps log r to [-20, 20] and k3 to [-10, 10]; we do not clamp.
  - verl's gspo caps the log ratio at 10; we do not.
  - verl's vanilla loss has dual clip (the loss of a token with A < 0 is capped at -A c, c = 3 by
    default) and clamps log rho to [-20, 20]; we have neither. Inputs here keep rho < 3.
  - verl's seq-mean-token-mean divides each sequence by |o_i| + 1e-8 (EasyR1's "seq" too), a
    relative difference below 1e-8 / |o_i|; the tight comparisons drop that 1e-8.
  - TRL's grpo and dr_grpo and EasyR1's "seq" average over every row, rows masked whole
    included; we (and verl) average over the rows that have a loss.
  - TRL's normalize_then_sum subtracts the batch mean, which is 0 up to rounding; we do not.
  - TRL's entropy bonus is a token mean over the kept tokens whatever the loss type; ours is
    averaged as the loss is, over every token of the mask.
"""

import math

import pytest
import torch

from grpo import kl_estimate, policy_loss, top_entropy_mask, weighted_advantages

F64 = torch.float64
# Six completions padded to T=5, lengths 5, 3, 1, 4, 0, 2: row 4 is masked whole (a truncated
# completion under --mask_truncated). Pads hold finite garbage: verl and TRL multiply by the mask,
# so an infinite pad would be NaN in their formulas (not in ours, see test_grpo.py).
LENGTHS = torch.tensor([5, 3, 1, 4, 0, 2])
N, T = len(LENGTHS), 5
MASK = (torch.arange(T) < LENGTHS.unsqueeze(1)).to(F64)  # (N, T)
_generator = torch.Generator().manual_seed(0)
LOGPROBS = torch.where(MASK.bool(), -2 * torch.rand(N, T, generator=_generator, dtype=F64),
                       7.0)  # (N, T)
OLD_LOGPROBS = LOGPROBS - 0.4 * torch.randn(N, T, generator=_generator, dtype=F64)  # (N, T)
# ref - logp within about +-1.5, so k3 stays under verl's clamp at 10.
REF_LOGPROBS = LOGPROBS + 0.5 * torch.randn(N, T, generator=_generator, dtype=F64)  # (N, T)
ADVANTAGES = torch.randn(N, generator=_generator, dtype=F64)  # (N,)
ENTROPY = 3 * torch.rand(N, T, generator=_generator, dtype=F64)  # (N, T)
EPS_LOW, EPS_HIGH = 0.2, 0.28


def assert_same(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-14)


def loss_and_grad(loss_of):
    """loss_of(logprobs) at LOGPROBS, and its gradient with respect to the log-probs."""
    logprobs = LOGPROBS.clone().requires_grad_()
    loss = loss_of(logprobs)
    loss.backward()
    return loss.detach(), logprobs.grad


def ours(logprobs, **kwargs):
    """Our policy_loss on the shared inputs; kwargs override its switches."""
    kwargs = {"beta": 0.0, "eps_low": EPS_LOW, "eps_high": EPS_HIGH, **kwargs}
    return policy_loss(logprobs, OLD_LOGPROBS, REF_LOGPROBS, ADVANTAGES, MASK, **kwargs)[0]


# ---- verl 0.9.1


def verl_kl_penalty(logprobs, ref_logprobs, name):
    """verl 0.9.1, verl/trainer/ppo/core_algos.py, kl_penalty_forward."""
    if name == "kl":
        return logprobs - ref_logprobs
    if name == "mse":
        return (logprobs - ref_logprobs) ** 2 / 2
    # "low_var_kl": k3 on log r clamped to [-20, 20], the result clamped to [-10, 10].
    log_r = (ref_logprobs - logprobs).clamp(-20, 20)
    return (log_r.exp() - log_r - 1).clamp(-10, 10)


def verl_agg_loss(loss_mat, mask, mode, loss_scale_factor=None, length_eps=1e-8):
    """verl 0.9.1, verl/trainer/ppo/core_algos.py, agg_loss, on one process (dp_size 1, the
    global counts taken from this batch). Sequence modes count only rows with a token."""
    token_sums = torch.where(mask.bool(), loss_mat, 0).sum(dim=1)  # (N,)
    lengths = mask.sum(dim=1)  # (N,)
    has_loss = lengths > 0  # (N,)
    if mode == "token-mean":
        return token_sums.sum() / lengths.sum()
    if mode == "seq-mean-token-mean":
        # verl's + 1e-8 also keeps 0/0 off a row without tokens; the where does that when 0.
        per_sequence = token_sums / (torch.where(has_loss, lengths, 1) + length_eps)  # (N,)
        return per_sequence[has_loss].sum() / has_loss.sum()
    if mode == "seq-mean-token-sum-norm":
        # loss_scale_factor None: verl divides by the padded width of the batch ("horizon").
        return token_sums[has_loss].sum() / has_loss.sum() / (loss_scale_factor or mask.shape[1])
    raise ValueError(mode)


def verl_vanilla_loss_mat(logprobs, old_logprobs, advantages, clip_ratio_c=3.0):
    """verl 0.9.1, verl/trainer/ppo/core_algos.py, compute_policy_loss_vanilla, per token before
    agg_loss; advantages per token (N, T) as verl's GRPO estimator hands them over."""
    ratio = (logprobs - old_logprobs).clamp(-20, 20).exp()
    clipped = torch.maximum(-advantages * ratio,
                            -advantages * ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH))
    # Dual clip: with A < 0 the loss is capped at -A * c.
    dual = torch.minimum(clipped, -advantages * clip_ratio_c)
    return torch.where(advantages < 0, dual, clipped)


def verl_gspo_loss_mat(logprobs, old_logprobs, advantages, mask, eps_low, eps_high):
    """verl 0.9.1, verl/trainer/ppo/core_algos.py, compute_policy_loss_gspo (GSPO-token), per
    token before agg_loss: log s_{i,t} = logp - sg(logp) + sg(mean_t log rho), capped at 10."""
    lengths = mask.sum(dim=1).clamp(min=1)  # (N,)
    mean_log_ratio = ((logprobs - old_logprobs) * mask).sum(dim=1) / lengths  # (N,)
    log_s = logprobs - logprobs.detach() + mean_log_ratio.detach().unsqueeze(1)  # (N, T)
    s = log_s.clamp(max=10).exp()  # (N, T)
    return torch.maximum(-advantages * s, -advantages * s.clamp(1 - eps_low, 1 + eps_high))


def verl_ppo_loss(logprobs, mode, kl_name, kl_coef, entropy_coeff, loss_scale_factor=None):
    """verl 0.9.1, verl/workers/utils/losses.py, ppo_loss: each term aggregated by agg_loss with
    the same mode, pg - entropy_coeff * entropy + kl_loss_coef * kl."""
    advantages = ADVANTAGES.unsqueeze(1) * MASK  # (N, T)

    def agg(loss_mat):
        return verl_agg_loss(loss_mat, MASK, mode, loss_scale_factor, length_eps=0)

    pg = agg(verl_vanilla_loss_mat(logprobs, OLD_LOGPROBS, advantages))
    kl = agg(verl_kl_penalty(logprobs, REF_LOGPROBS, kl_name))
    return pg - entropy_coeff * agg(ENTROPY) + kl_coef * kl


# ---- TRL 1.16.0


def trl_policy_loss(logprobs, loss_type, importance_sampling_level, max_completion_length=None):
    """TRL 1.16.0, trl/trainer/grpo_trainer.py, GRPOTrainer._compute_loss with beta 0, on one
    process, one accumulation step and steps_per_generation 1."""
    log_ratio = logprobs - OLD_LOGPROBS  # (N, T)
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * MASK).sum(-1) / MASK.sum(-1).clamp(min=1)).unsqueeze(1)  # (N, 1)
    ratio = log_ratio.exp()
    advantages = ADVANTAGES.unsqueeze(1)  # (N, 1)
    per_token = -torch.minimum(ratio * advantages,
                               ratio.clamp(1 - EPS_LOW, 1 + EPS_HIGH) * advantages)
    if loss_type == "grpo":
        # .mean() over every row, the rows masked whole included.
        return ((per_token * MASK).sum(-1) / MASK.sum(-1).clamp(min=1)).mean()
    if loss_type == "dapo":
        # num_items_in_batch: the tokens of the whole generation batch.
        return (per_token * MASK).sum() / MASK.sum()
    if loss_type == "dr_grpo":
        return (per_token * MASK).sum() / (per_token.shape[0] * max_completion_length)
    raise ValueError(loss_type)


def trl_sum_then_normalize(reward_table, weights, group_size, scale_rewards):
    """TRL 1.16.0, trl/trainer/grpo_trainer.py, multi_objective_aggregation="sum_then_normalize"."""
    rewards = (reward_table * weights).sum(dim=1)  # (N,)
    grouped = rewards.view(-1, group_size)  # (B, G)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)  # (N,)
    if scale_rewards == "none":
        return centered
    if scale_rewards == "group":
        std = grouped.std(dim=1).repeat_interleave(group_size)  # (N,)
    else:
        std = rewards.std()
    return centered / (std + 1e-4)


def trl_normalize_then_sum(reward_table, weights, group_size):
    """TRL 1.16.0, trl/trainer/grpo_trainer.py, multi_objective_aggregation="normalize_then_sum":
    each reward z-scored in its group, the weighted sum, then (x - mean) / (std + 1e-4)."""
    grouped = reward_table.view(-1, group_size, reward_table.shape[1])  # (B, G, R)
    each = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True)
                                                            + 1e-4)  # (B, G, R)
    summed = (each.view(reward_table.shape) * weights).sum(dim=1)  # (N,)
    return (summed - summed.mean()) / (summed.std() + 1e-4)


def trl_high_entropy_mask(entropy, mask, threshold):
    """TRL 1.16.0, trl/trainer/grpo_trainer.py, get_high_entropy_mask on one process."""
    values = entropy[mask.bool()].float()  # (tokens,)
    if values.numel() == 0:
        return torch.zeros_like(entropy, dtype=torch.bool)
    return (entropy * mask >= torch.quantile(values, threshold)) & mask.bool()


def trl_entropy_bonus(entropy, mask, entropy_mask=None):
    """TRL 1.16.0, trl/trainer/grpo_trainer.py, _compute_loss: the H that entropy_coef * H is
    subtracted from the loss, a token mean over the tokens the entropy mask keeps."""
    kept = mask if entropy_mask is None else mask * entropy_mask
    return (entropy * kept).sum() / kept.sum().clamp(min=1)


# ---- EasyR1 at 2a319e3


def easyr1_gspo_loss(logprobs, clip_ratio_dual=3.0):
    """EasyR1 2a319e3, verl/trainer/core_algos.py, compute_policy_loss with loss_type "gspo"
    and loss_avg_mode "seq" (average_loss): one ratio per sequence, the clip taken in log space,
    dual clip, then each row's token mean over |o_i| + 1e-8 and the mean over every row."""
    lengths = MASK.sum(dim=1)  # (N,)
    mean_log_ratio = ((logprobs - OLD_LOGPROBS) * MASK).sum(dim=1) / (lengths + 1e-8)  # (N,)
    log_ratio = mean_log_ratio.unsqueeze(1) * MASK  # (N, T)
    ratio = log_ratio.clamp(-20, 20).exp()
    clipped_ratio = log_ratio.clamp(math.log(1 - EPS_LOW), math.log(1 + EPS_HIGH)).exp()
    advantages = ADVANTAGES.unsqueeze(1) * MASK  # (N, T)
    higher = torch.maximum(-advantages * ratio, -advantages * clipped_ratio)
    per_token = torch.where(advantages < 0,
                            torch.minimum(higher, -advantages * clip_ratio_dual), higher)
    return ((per_token * MASK).sum(-1) / (lengths + 1e-8)).mean()


# ---- KL estimators


def test_inputs_stay_inside_the_peers_clamps():
    # Every comparison below relies on this: verl's k3 clamp at 10, its dual clip at rho = 3.
    real = MASK.bool()
    assert kl_estimate(LOGPROBS, REF_LOGPROBS)[real].max() < 10
    assert (LOGPROBS - OLD_LOGPROBS)[real].exp().max() < 3


@pytest.mark.parametrize("estimator, verl_name", [("k1", "kl"), ("k2", "mse"),
                                                  ("k3", "low_var_kl")])
def test_kl_estimators_equal_verls_kl_penalty(estimator, verl_name):
    real = MASK.bool()
    weights = torch.rand(N, T, generator=torch.Generator().manual_seed(1), dtype=F64)
    values, grads = [], []
    for kl in (lambda lp: kl_estimate(lp, REF_LOGPROBS, estimator),
               lambda lp: verl_kl_penalty(lp, REF_LOGPROBS, verl_name)):
        logprobs = LOGPROBS.clone().requires_grad_()
        value = kl(logprobs)
        (value[real] * weights[real]).sum().backward()
        values.append(value.detach()[real])
        grads.append(logprobs.grad)
    assert_same(values[0], values[1])
    assert_same(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_verl_low_var_kl_clamps_where_our_k3_does_not():
    # log r = ref - logp: 25 (beyond verl's [-20, 20]), 5 and -15 (inside it, but k3 > 10).
    log_r = torch.tensor([25.0, 5.0, -15.0], dtype=F64)
    logprobs = torch.full((3,), -1.0, dtype=F64)
    ours_k3 = kl_estimate(logprobs, logprobs + log_r, "k3")
    verl_k3 = verl_kl_penalty(logprobs, logprobs + log_r, "low_var_kl")
    expected = torch.tensor([math.exp(25) - 26, math.exp(5) - 6, math.exp(-15) + 14], dtype=F64)
    assert_same(ours_k3, expected)
    assert_same(verl_k3, torch.full((3,), 10.0, dtype=F64))


# ---- loss aggregation


@pytest.mark.parametrize("loss_type, mode", [("dapo", "token-mean"),
                                             ("grpo", "seq-mean-token-mean"),
                                             ("dr_grpo", "seq-mean-token-sum-norm")])
def test_loss_types_equal_verls_agg_loss_modes(loss_type, mode):
    # dr_grpo: verl's loss_scale_factor is our max_completion_length T_max (when None, verl takes
    # the batch's padded width and so do we); both count only the rows that have a loss.
    advantages = ADVANTAGES.unsqueeze(1) * MASK  # (N, T)
    peer = loss_and_grad(lambda lp: verl_agg_loss(
        verl_vanilla_loss_mat(lp, OLD_LOGPROBS, advantages), MASK, mode, loss_scale_factor=8,
        length_eps=0))
    mine = loss_and_grad(lambda lp: ours(lp, loss_type=loss_type, max_completion_length=8))
    assert_same(mine[0], peer[0])
    assert_same(mine[1], peer[1])
    assert mine[1].abs().sum() > 0


def test_verl_seq_mean_adds_1e_8_to_each_length():
    advantages = ADVANTAGES.unsqueeze(1) * MASK  # (N, T)
    loss_mat = verl_vanilla_loss_mat(LOGPROBS, OLD_LOGPROBS, advantages)  # (N, T)
    verl = verl_agg_loss(loss_mat, MASK, "seq-mean-token-mean")
    mine = ours(LOGPROBS, loss_type="grpo")
    # Row by row verl's mean is ours times |o_i| / (|o_i| + 1e-8).
    lengths = MASK.sum(dim=1)[LENGTHS > 0]  # (5,)
    per_row = torch.where(MASK.bool(), loss_mat, 0).sum(dim=1)[LENGTHS > 0] / lengths  # (5,)
    assert_same(verl, (per_row * lengths / (lengths + 1e-8)).mean())
    assert_same(mine, per_row.mean())
    assert verl != mine and abs(verl - mine) < 1e-8 * abs(per_row).max()


@pytest.mark.parametrize("loss_type, max_completion_length, ratio_to_ours", [
    ("grpo", None, 5 / 6), ("dapo", None, 1.0), ("dr_grpo", 8, 5 / 6)])
def test_trls_loss_types_average_over_every_row(loss_type, max_completion_length, ratio_to_ours):
    # TRL's grpo and dr_grpo divide by all 6 rows, ours by the 5 that have a loss; dapo is a
    # token mean in both.
    trl = loss_and_grad(lambda lp: trl_policy_loss(lp, loss_type, "token", max_completion_length))
    mine = loss_and_grad(
        lambda lp: ours(lp, loss_type=loss_type, max_completion_length=max_completion_length))
    assert_same(trl[0], ratio_to_ours * mine[0])
    assert_same(trl[1], ratio_to_ours * mine[1])


def test_verl_dual_clip_and_ratio_clamp_cap_what_ours_leaves_alone():
    mask = torch.ones(1, 1, dtype=F64)
    # rho = 5 with A = -1: verl's dual clip caps the loss at -A * 3, ours is -A * rho = 5.
    logprobs, old = torch.zeros(1, 1, dtype=F64), -torch.full((1, 1), math.log(5), dtype=F64)
    minus_one = -torch.ones(1, 1, dtype=F64)
    verl = verl_vanilla_loss_mat(logprobs, old, minus_one)
    mine, _ = policy_loss(logprobs, old, None, minus_one[0], mask, beta=0.0, eps_low=EPS_LOW,
                          eps_high=EPS_HIGH)
    assert verl.item() == pytest.approx(3.0, rel=1e-12)
    assert mine.item() == pytest.approx(5.0, rel=1e-12)
    # log rho = -25 with A = +1: verl clamps log rho to -20.
    old = torch.full((1, 1), 25.0, dtype=F64)
    verl = verl_vanilla_loss_mat(logprobs, old, -minus_one)
    mine, _ = policy_loss(logprobs, old, None, -minus_one[0], mask, beta=0.0)
    assert verl.item() == pytest.approx(-math.exp(-20), rel=1e-12)
    assert mine.item() == pytest.approx(-math.exp(-25), rel=1e-12)


# ---- KL and entropy terms in the loss


@pytest.mark.parametrize("estimator, verl_name", [("k1", "kl"), ("k2", "mse"),
                                                  ("k3", "low_var_kl")])
@pytest.mark.parametrize("loss_type, mode", [("dapo", "token-mean"),
                                             ("grpo", "seq-mean-token-mean"),
                                             ("dr_grpo", "seq-mean-token-sum-norm")])
def test_kl_and_entropy_terms_equal_verls_ppo_loss(estimator, verl_name, loss_type, mode):
    # verl aggregates the policy, entropy and KL terms one by one with the same agg_loss; we add
    # them per token and aggregate once. Linear, so the same.
    peer = loss_and_grad(lambda lp: verl_ppo_loss(lp, mode, verl_name, kl_coef=0.04,
                                                  entropy_coeff=0.01, loss_scale_factor=T))
    mine = loss_and_grad(lambda lp: ours(lp, loss_type=loss_type, beta=0.04,
                                         kl_estimator=estimator, entropy=ENTROPY,
                                         entropy_coef=0.01))
    assert_same(mine[0], peer[0])
    assert_same(mine[1], peer[1])


@pytest.mark.parametrize("loss_type, mode", [("dapo", "token-mean"),
                                             ("grpo", "seq-mean-token-mean"),
                                             ("dr_grpo", "seq-mean-token-sum-norm")])
def test_entropy_bonus_equals_verls_entropy_coeff_term(loss_type, mode):
    # With A = 0 the policy term is 0 and beta = 0 drops the KL: what is left is -c * H averaged.
    entropy = ENTROPY.clone().requires_grad_()
    mine, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, None, torch.zeros(N, dtype=F64), MASK,
                          beta=0.0, loss_type=loss_type, entropy=entropy, entropy_coef=0.01)
    mine.backward()
    peer_entropy = ENTROPY.clone().requires_grad_()
    peer = -0.01 * verl_agg_loss(peer_entropy, MASK, mode, length_eps=0)
    peer.backward()
    assert_same(mine, peer)
    assert_same(entropy.grad, peer_entropy.grad)
    assert mine < 0


def test_trls_entropy_bonus_is_a_token_mean_over_the_kept_tokens():
    zero = torch.zeros(N, dtype=F64)

    def entropy_term(entropy_mask):
        loss, _ = policy_loss(LOGPROBS, OLD_LOGPROBS, None, zero, MASK, beta=0.0,
                              loss_type="dapo", entropy=ENTROPY, entropy_coef=0.01,
                              entropy_mask=entropy_mask)
        return loss

    # Without the entropy mask TRL's bonus is our dapo term.
    assert_same(entropy_term(None), -0.01 * trl_entropy_bonus(ENTROPY, MASK))
    # With it TRL divides by the kept tokens, we by every token of the mask.
    kept = top_entropy_mask(ENTROPY, MASK, keep=0.5)
    share = kept.sum() / MASK.sum()
    assert 0 < share < 1
    assert_same(entropy_term(kept), -0.01 * trl_entropy_bonus(ENTROPY, MASK, kept) * share)


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_top_entropy_mask_equals_trls_on_one_process(keep):
    mine = top_entropy_mask(ENTROPY, MASK, keep)
    assert torch.equal(mine, trl_high_entropy_mask(ENTROPY, MASK, 1 - keep))
    assert 0 < mine.sum() < MASK.sum()
    # No tokens at all: neither keeps any.
    none = torch.zeros_like(MASK)
    assert torch.equal(top_entropy_mask(ENTROPY, none, keep),
                       trl_high_entropy_mask(ENTROPY, none, 1 - keep))


# ---- GSPO


def test_gspo_equals_verls_gspo_token_loss_in_value_and_gradient():
    # GSPO's own clip range (3e-4, 4e-4) clips some sequences and not others here; with one
    # advantage per sequence, GSPO-token is GSPO, so value and gradient agree.
    advantages = ADVANTAGES.unsqueeze(1) * MASK  # (N, T)
    peer = loss_and_grad(lambda lp: verl_agg_loss(
        verl_gspo_loss_mat(lp, OLD_LOGPROBS, advantages, MASK, 3e-4, 4e-4), MASK,
        "seq-mean-token-mean", length_eps=0))
    mine = loss_and_grad(lambda lp: ours(lp, importance_sampling_level="sequence",
                                         eps_low=3e-4, eps_high=4e-4))
    assert_same(mine[0], peer[0])
    assert_same(mine[1], peer[1])
    moved = mine[1].abs().sum(dim=1) > 0  # (N,)
    assert moved.any() and not moved[LENGTHS > 0].all()


def test_verl_gspo_caps_the_log_ratio_at_10_where_ours_does_not():
    # Mean log ratio 12 with A = -1: the unclipped term is the max, so the cap shows.
    logprobs = torch.zeros(1, 3, dtype=F64, requires_grad=True)
    old, mask = torch.full((1, 3), -12.0, dtype=F64), torch.ones(1, 3, dtype=F64)
    minus_one = -torch.ones(1, dtype=F64)
    verl = verl_agg_loss(verl_gspo_loss_mat(logprobs, old, -mask, mask, EPS_LOW, EPS_HIGH), mask,
                         "seq-mean-token-mean", length_eps=0)
    mine, _ = policy_loss(logprobs, old, None, minus_one, mask, beta=0.0,
                          importance_sampling_level="sequence")
    assert verl.item() == pytest.approx(math.exp(10), rel=1e-12)
    assert mine.item() == pytest.approx(math.exp(12), rel=1e-12)
    # Beyond the cap verl's gradient is 0; ours is e^12 / 3 per token.
    (verl_grad,) = torch.autograd.grad(verl, logprobs)
    (our_grad,) = torch.autograd.grad(mine, logprobs)
    assert torch.equal(verl_grad, torch.zeros(1, 3, dtype=F64))
    assert_same(our_grad, torch.full((1, 3), math.exp(12) / 3, dtype=F64))


def test_gspo_equals_trls_sequence_level_loss_over_every_row():
    # TRL's grpo loss type averages over all 6 rows, ours over the 5 that have a loss.
    trl = loss_and_grad(lambda lp: trl_policy_loss(lp, "grpo", "sequence"))
    mine = loss_and_grad(lambda lp: ours(lp, importance_sampling_level="sequence"))
    assert_same(trl[0], 5 / 6 * mine[0])
    assert_same(trl[1], 5 / 6 * mine[1])
    assert mine[1].abs().sum() > 0


def test_gspo_equals_easyr1s_gspo_over_every_row():
    # EasyR1's "seq" averages over all 6 rows and adds 1e-8 to each length (relative 1e-8).
    peer = loss_and_grad(easyr1_gspo_loss)
    mine = loss_and_grad(lambda lp: ours(lp, importance_sampling_level="sequence"))
    torch.testing.assert_close(peer[0], 5 / 6 * mine[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(peer[1], 5 / 6 * mine[1], rtol=1e-8, atol=1e-14)


# ---- advantages: weighted rewards and GDPO

# Four groups of G=4, three rewards (two 0/1 rules and a graded one); the last group has every
# reward equal.
REWARD_TABLE = torch.tensor([[1, 1, 0.5], [0, 1, 0.25], [1, 0, 1.0], [0, 0, 0.0],
                             [1, 1, 0.9], [1, 1, 0.1], [1, 0, 0.3], [1, 1, 0.3],
                             [0, 1, 0.0], [0, 0, 0.7], [0, 1, 0.2], [1, 1, 0.6],
                             [1, 1, 0.5], [1, 1, 0.5], [1, 1, 0.5], [1, 1, 0.5]], dtype=F64)
REWARD_WEIGHTS = torch.tensor([1.0, 0.5, 2.0], dtype=F64)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_weighted_advantages_equal_trls_sum_then_normalize(scale):
    assert_same(weighted_advantages(REWARD_TABLE, REWARD_WEIGHTS, 4, scale),
                trl_sum_then_normalize(REWARD_TABLE, REWARD_WEIGHTS, 4, scale))


def test_gdpo_equals_trls_normalize_then_sum_but_for_the_zero_batch_mean():
    mine = weighted_advantages(REWARD_TABLE, REWARD_WEIGHTS, 4, "gdpo")
    trl = trl_normalize_then_sum(REWARD_TABLE, REWARD_WEIGHTS, 4)
    assert_same(mine, trl)
    # We do not subtract the batch mean (0 up to rounding), so the equal group stays exactly 0.
    assert torch.equal(mine[12:], torch.zeros(4, dtype=F64))
    assert mine[:12].abs().min() > 0.1
