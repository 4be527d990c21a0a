"""The GRPO math against values worked out by hand (float64 so comparisons can be tight)."""

import math

import pytest
import torch

import rewards
from grpo import (equal_reward_groups, group_advantages, kl_estimate, policy_loss, sampler_gap,
                  top_entropy_mask, weighted_advantages)

F64 = torch.float64
# Two groups of G=4: the first has spread, the second is all equal.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], dtype=F64)


def test_advantages_divide_by_each_groups_bessel_std():
    # Group 1: mean 0.5, deviations +-0.5, std = sqrt(4 * 0.5**2 / 3) = sqrt(1/3).
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0], dtype=F64)
    advantages = group_advantages(REWARDS, group_size=4)
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=0)
    assert torch.equal(advantages[4:], torch.zeros(4, dtype=F64))


def test_unscaled_advantages_are_only_centered():
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="none"), expected, rtol=0, atol=0)


def test_batch_scale_divides_by_the_std_of_all_rewards():
    # Batch mean 10/8 = 1.25; squared deviations 4 * 0.0625 ... :
    # (0.25^2 + 1.25^2 + 1.25^2 + 0.25^2) + 4 * 0.75^2 = 3.25 + 2.25 = 5.5, std = sqrt(5.5 / 7).
    a = 0.5 / (math.sqrt(5.5 / 7) + 1e-4)
    expected = torch.tensor([a, -a, -a, a, 0, 0, 0, 0], dtype=F64)
    torch.testing.assert_close(group_advantages(REWARDS, 4, scale="batch"), expected,
                               rtol=1e-12, atol=0)


def test_group_advantages_reject_an_unknown_scale():
    with pytest.raises(ValueError):
        group_advantages(REWARDS, 4, scale="global")


def test_kl_k3_matches_hand_values():
    logprobs = torch.tensor([-1.0, -2.0, -0.7], dtype=F64)
    ref_logprobs = torch.tensor([-2.0, -1.0, -0.7], dtype=F64)
    # log_ratio = ref - logp: -1 -> exp(-1) + 1 - 1 = exp(-1) ~ 0.3679; +1 -> e - 1 - 1 ~ 0.7183;
    # 0 (the policy equals the reference) -> 0.
    expected = torch.tensor([math.exp(-1), math.e - 2, 0.0], dtype=F64)
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs), expected, rtol=1e-12, atol=0)


def test_kl_k3_is_never_negative():
    generator = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = 3 * torch.randn(2, 1000, generator=generator, dtype=F64)
    assert (kl_estimate(logprobs, ref_logprobs) >= 0).all()


# Three completions of lengths 3, 2, 4 padded to T=4. The pad positions hold
# garbage that the mask must hide.
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=F64)
LOGPROBS = torch.tensor([[-0.5, -1.0, -2.0, 7.0], [-0.3, -1.5, -9.0, 5.0],
                         [-1.0, -0.2, -0.8, -3.0]], dtype=F64)
ADVANTAGES = torch.tensor([1.0, -0.5, 2.0], dtype=F64)
# Ratios pi/pi_old per token, set through old_logprobs = logprobs - log(ratio).
RATIOS = torch.tensor([[1.5, 0.5, 1.1, 9.0], [0.75, 1.5, 3.0, 0.1], [1.0, 1.25, 1.3, 0.9]],
                      dtype=F64)
# ref - logp per token, chosen so that k3 is 1 - ln 2 (at +ln 2) or ln 2 - 1/2 (at -ln 2).
LN2 = math.log(2)
REF_SHIFT = torch.tensor([[LN2, 0, 0, 4.0], [-LN2, 0, -3.0, 2.0], [0, 0, 0, LN2]], dtype=F64)


def test_policy_loss_clips_both_sides_as_by_hand():
    loss, metrics = policy_loss(LOGPROBS, LOGPROBS - RATIOS.log(), LOGPROBS + REF_SHIFT, ADVANTAGES,
                                MASK, beta=0.1, eps_low=0.2, eps_high=0.28)
    # Clip range [0.8, 1.28]. Per token S = min(rho * A, clip(rho) * A):
    # row 0, A=+1:   1.5 -> clipped to 1.28 (clip acts); 0.5 -> 0.5 (below range, A>0: unclipped
    #                is lower); 1.1 -> 1.1
    #                mean S = (1.28 + 0.5 + 1.1) / 3 = 2.88 / 3 = 0.96
    # row 1, A=-0.5: 0.75 -> min(-0.375, 0.8 * -0.5 = -0.4) = -0.4 (clip acts);
    #                1.5 -> min(-0.75, -0.64) = -0.75
    #                mean S = (-0.4 - 0.75) / 2 = -0.575
    # row 2, A=+2:   1.0 -> 2.0; 1.25 -> 2.5; 1.3 -> 1.28 * 2 = 2.56 (clip acts); 0.9 -> 1.8
    #                mean S = (2.0 + 2.5 + 2.56 + 1.8) / 4 = 8.86 / 4 = 2.215
    policy_term = -(0.96 - 0.575 + 2.215) / 3  # = -2.6 / 3
    # k3 per sequence: row 0 (1 - ln2) / 3, row 1 (ln2 - 1/2) / 2, row 2 (1 - ln2) / 4.
    kl_term = ((1 - LN2) / 3 + (LN2 - 0.5) / 2 + (1 - LN2) / 4) / 3
    expected = torch.tensor(policy_term + 0.1 * kl_term, dtype=F64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # 3 clipped tokens of 9; token-mean k3 = (2 * (1 - ln2) + ln2 - 1/2) / 9 = (1.5 - ln2) / 9.
    assert metrics["clip_frac"] == pytest.approx(3 / 9, rel=1e-12)
    assert metrics["kl"] == pytest.approx((1.5 - LN2) / 9, rel=1e-12)


def test_at_ratio_one_the_loss_is_the_plain_surrogate():
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, metrics = policy_loss(logprobs, logprobs.detach(), None, ADVANTAGES, MASK, beta=0.0)
    loss.backward()
    # rho = 1 everywhere, so the loss is -mean_i(A_i) = -(1 - 0.5 + 2) / 3, and
    # d loss / d logp_{i,t} = -A_i / (N * |o_i|) on real tokens: -1/9, +0.5/6, -2/12.
    torch.testing.assert_close(loss, torch.tensor(-2.5 / 3, dtype=F64), rtol=1e-12, atol=0)
    expected_grad = torch.tensor([-1 / 9, 0.5 / 6, -2 / 12], dtype=F64).unsqueeze(1) * MASK
    torch.testing.assert_close(logprobs.grad, expected_grad, rtol=1e-12, atol=0)
    assert metrics["clip_frac"] == 0.0
    # The same with a clip range so wide it can never act.
    unclipped = LOGPROBS.clone().requires_grad_()
    unclipped_loss, _ = policy_loss(
        unclipped, unclipped.detach(), None, ADVANTAGES, MASK, beta=0.0, eps_low=1e9, eps_high=1e9
    )
    unclipped_loss.backward()
    torch.testing.assert_close(loss, unclipped_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(logprobs.grad, unclipped.grad, rtol=1e-12, atol=0)


def test_zero_variance_group_gives_zero_gradient():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]] * 2, dtype=F64)
    logprobs = -torch.rand(8, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    logprobs.requires_grad_()
    advantages = group_advantages(rewards, 4)
    loss, _ = policy_loss(logprobs, logprobs.detach(), None, advantages, mask, beta=0.0)
    loss.backward()
    assert torch.equal(logprobs.grad[:4], torch.zeros(4, 3, dtype=F64))
    # Group 2 has A = +-0.5 / (sqrt(1/3) + 1e-4), never 0, so every real token moves.
    assert (logprobs.grad[4:][mask[4:] == 1] != 0).all()


def test_kl_term_vanishes_when_policy_equals_reference():
    old_logprobs = LOGPROBS - RATIOS.log()
    loss, metrics = policy_loss(LOGPROBS, old_logprobs, LOGPROBS.clone(), ADVANTAGES, MASK,
                                beta=0.04)
    loss_without_kl, _ = policy_loss(LOGPROBS, old_logprobs, None, ADVANTAGES, MASK, beta=0.0)
    assert metrics["kl"] == 0.0
    torch.testing.assert_close(loss, loss_without_kl, rtol=0, atol=0)


def test_policy_loss_rejects_unknown_loss_type():
    with pytest.raises(ValueError):
        policy_loss(LOGPROBS, LOGPROBS, None, ADVANTAGES, MASK, beta=0.0, loss_type="ppo")


def loss_and_gradient(logprobs):
    """policy_loss (beta 0.1, RATIOS, REF_SHIFT) at these log-probs, and its gradient."""
    logprobs = logprobs.clone().requires_grad_()
    old_logprobs = logprobs.detach() - RATIOS.log()
    loss, _ = policy_loss(logprobs, old_logprobs, logprobs.detach() + REF_SHIFT, ADVANTAGES, MASK,
                          beta=0.1)
    loss.backward()
    return loss, logprobs.grad


def test_padded_tokens_get_zero_gradient():
    pad = MASK == 0
    _, grad = loss_and_gradient(LOGPROBS)  # garbage in the pads
    assert torch.equal(grad[pad], torch.zeros(int(pad.sum()), dtype=F64))


def test_pad_values_change_neither_loss_nor_gradient():
    garbage_loss, garbage_grad = loss_and_gradient(LOGPROBS)
    tidy_loss, tidy_grad = loss_and_gradient(LOGPROBS.masked_fill(MASK == 0, -1.0))
    torch.testing.assert_close(garbage_loss, tidy_loss, rtol=0, atol=0)
    torch.testing.assert_close(garbage_grad, tidy_grad, rtol=0, atol=0)


@pytest.mark.parametrize("garbage", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_padding_gives_a_finite_gradient(garbage):
    logprobs = LOGPROBS.masked_fill(MASK == 0, garbage).requires_grad_()
    old = LOGPROBS.masked_fill(MASK == 0, -garbage if garbage == garbage else garbage)
    loss, _ = policy_loss(logprobs, old, LOGPROBS + REF_SHIFT, ADVANTAGES, MASK, beta=0.1)
    loss.backward()
    assert loss.isfinite() and logprobs.grad.isfinite().all()


# ---- loss aggregation (issue: the GRPO family as switches)
# With ratio 1 and beta 0 every token's term is x_{i,t} = -A_i, which keeps the
# hand arithmetic short: sequence lengths 3, 2, 4 and A = 1, -0.5, 2.


def test_grpo_loss_is_the_mean_of_per_sequence_means():
    # Each sequence's mean is -A_i: (-1 + 0.5 - 2) / 3 = -2.5 / 3.
    loss, _ = policy_loss(LOGPROBS, LOGPROBS, None, ADVANTAGES, MASK, beta=0.0, loss_type="grpo")
    assert loss.item() == pytest.approx(-2.5 / 3, rel=1e-12)


def test_dapo_loss_is_the_mean_over_all_tokens():
    # Token sum: 3 * -1 + 2 * 0.5 + 4 * -2 = -3 + 1 - 8 = -10 over 9 tokens.
    loss, _ = policy_loss(LOGPROBS, LOGPROBS, None, ADVANTAGES, MASK, beta=0.0, loss_type="dapo")
    assert loss.item() == pytest.approx(-10 / 9, rel=1e-12)


def test_dr_grpo_loss_divides_by_n_times_max_length():
    # Token sum -10 over N * T_max = 3 * 16.
    loss, _ = policy_loss(LOGPROBS, LOGPROBS, None, ADVANTAGES, MASK, beta=0.0, loss_type="dr_grpo",
                          max_completion_length=16)
    assert loss.item() == pytest.approx(-10 / 48, rel=1e-12)


def weight_gradient(pieces, loss_type, denominator_of):
    """d loss / d w for logprobs = LOGPROBS + w (one shared weight per position), summed over
    pieces.

    Each piece is (rows, share of ranks): its gradient is scaled by 1 / ranks as
    FSDP's gradient averaging does, and its denominator comes from denominator_of.
    """
    w = torch.zeros(4, dtype=F64, requires_grad=True)
    for rows, ranks in pieces:
        logprobs = LOGPROBS[rows] + w
        # ratio != 1 on rows 1, 2
        old = (LOGPROBS + 0.1 * torch.arange(3, dtype=F64).unsqueeze(1))[rows]
        loss, _ = policy_loss(logprobs, old, logprobs.detach() - 0.3, ADVANTAGES[rows], MASK[rows],
                              beta=0.04, loss_type=loss_type, max_completion_length=4,
                              denominator=denominator_of(ranks))
        (loss / ranks).backward()
    return w.grad


@pytest.mark.parametrize("loss_type, whole_count", [("dapo", 9), ("grpo", 3), ("dr_grpo", 3 * 4)])
def test_gradient_is_the_same_however_the_batch_splits(loss_type, whole_count):
    whole = weight_gradient([([0, 1, 2], 1)], loss_type, lambda ranks: whole_count)
    # Two micro-batches on one rank: both pass the whole step's count.
    micro = weight_gradient([([0, 1], 1), ([2], 1)], loss_type, lambda ranks: whole_count)
    # Two ranks: each passes count / 2, and the gradients are averaged.
    ranks = weight_gradient([([0, 2], 2), ([1], 2)], loss_type, lambda ranks: whole_count / ranks)
    torch.testing.assert_close(micro, whole, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(ranks, whole, rtol=1e-12, atol=1e-15)
    assert whole.abs().sum() > 0


def test_clip_fractions_count_each_side_separately():
    # Ratios by row: 1.5 with A > 0 (clipped high), 0.5 with A < 0 (clipped low), 1 (not clipped).
    logprobs = torch.zeros(3, 2, dtype=F64)
    old = -torch.tensor([[math.log(1.5)] * 2, [math.log(0.5)] * 2, [0.0] * 2], dtype=F64)
    _, metrics = policy_loss(logprobs, old, None, torch.tensor([1.0, -1.0, 1.0], dtype=F64),
                             torch.ones(3, 2), beta=0.0, eps_low=0.2, eps_high=0.28)
    assert metrics["clip_frac_high"] == pytest.approx(2 / 6)
    assert metrics["clip_frac_low"] == pytest.approx(2 / 6)
    assert metrics["ratio_min"] == pytest.approx(0.5) and metrics["ratio_max"] == pytest.approx(1.5)


# ---- the 2026 switches (issue 25): each against values worked out by hand


def test_reward_weights_scale_each_reward_before_the_sum():
    # Two groups of G=2, rewards (format, accuracy), weights (1, 2): sums 1, 2 and 3, 0.
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64)
    weights = torch.tensor([1.0, 2.0], dtype=F64)
    # Group 1: mean 1.5, deviations -+0.5, Bessel std sqrt(0.5); group 2: -+1.5, sqrt(4.5).
    a, b = 0.5 / (math.sqrt(0.5) + 1e-4), 1.5 / (math.sqrt(4.5) + 1e-4)
    expected = torch.tensor([-a, a, b, -b], dtype=F64)
    torch.testing.assert_close(weighted_advantages(table, weights, 2), expected, rtol=1e-12, atol=0)


def test_gdpo_normalises_each_reward_in_its_group_then_the_batch():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=F64)
    weights = torch.tensor([1.0, 2.0], dtype=F64)
    # Every column of both groups is (1, 0) or (0, 1): z = +-a, a = 0.5 / (sqrt(0.5) + 1e-4).
    # Group 1: Z = (a - 2a, -a + 2a) = (-a, a); group 2: (a + 2a, -a - 2a) = (3a, -3a).
    # Batch: mean 0, Bessel variance (1 + 1 + 9 + 9) a^2 / 3, std a * sqrt(20 / 3).
    a = 0.5 / (math.sqrt(0.5) + 1e-4)
    z = torch.tensor([-a, a, 3 * a, -3 * a], dtype=F64)
    expected = z / (a * math.sqrt(20 / 3) + 1e-4)
    advantages = weighted_advantages(table, weights, 2, scale="gdpo")
    torch.testing.assert_close(advantages, expected, rtol=1e-12, atol=0)
    # With equal weights GDPO sees group 1's trade (format for accuracy) as no difference.
    equal = weighted_advantages(table, torch.ones(2, dtype=F64), 2, scale="gdpo")
    assert equal[0] == equal[1] == 0


def test_gdpo_keeps_a_group_of_equal_rewards_at_exactly_zero():
    table = torch.tensor([[0.3, 1.0], [0.3, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    advantages = weighted_advantages(table, torch.tensor([0.7, 1.3], dtype=F64), 2, "gdpo")
    assert torch.equal(advantages[:2], torch.zeros(2, dtype=F64)) and (advantages[2:] != 0).all()


def test_equal_reward_groups_follow_the_weighted_sum_or_each_reward():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]], dtype=F64)
    ones, tilted = torch.ones(2, dtype=F64), torch.tensor([1.0, 2.0], dtype=F64)
    # Group 1's sums are equal (1, 1) with weights 1, not with (1, 2); its rewards never are.
    assert equal_reward_groups(table, ones, 2).tolist() == [True, True]
    assert equal_reward_groups(table, tilted, 2).tolist() == [False, True]
    assert equal_reward_groups(table, ones, 2, scale="gdpo").tolist() == [False, True]


@pytest.mark.parametrize("estimator, expected", [
    # log r = ref - logp = -1, +1, 0.
    ("k1", [1.0, -1.0, 0.0]),
    ("k2", [0.5, 0.5, 0.0]),
    ("k3", [math.exp(-1), math.e - 2, 0.0]),
])
def test_kl_estimators_match_hand_values(estimator, expected):
    logprobs = torch.tensor([-1.0, -2.0, -0.7], dtype=F64)
    ref_logprobs = torch.tensor([-2.0, -1.0, -0.7], dtype=F64)
    torch.testing.assert_close(kl_estimate(logprobs, ref_logprobs, estimator),
                               torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0)


def test_kl_estimate_rejects_an_unknown_estimator():
    with pytest.raises(ValueError):
        kl_estimate(LOGPROBS, LOGPROBS, "k4")


@pytest.mark.parametrize("estimator, direction", [("k1", None), ("k2", "pi||ref"),
                                                  ("k3", "ref||pi")])
def test_kl_estimators_gradients_in_expectation(estimator, direction):
    """Equation (4)'s claims, exactly: over a 5-token vocabulary, the expected gradient of the
    estimate at a token drawn from pi (the token held fixed) is 0 for k1, the gradient of
    KL(pi || pi_ref) for k2 and of KL(pi_ref || pi) for k3."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.randn(5, generator=generator, dtype=F64, requires_grad=True)
    ref = torch.randn(5, generator=generator, dtype=F64).log_softmax(0)
    logp = theta.log_softmax(0)
    # sum_x pi(x) * grad k(x), with pi(x) a constant weight: the score-function expectation.
    expected_grad = torch.autograd.grad((logp.exp().detach() * kl_estimate(logp, ref, estimator))
                                        .sum(), theta)[0]
    logp = theta.log_softmax(0)  # a graph of its own for the true KL
    kl = {None: 0 * theta.sum(), "pi||ref": (logp.exp() * (logp - ref)).sum(),
          "ref||pi": (ref.exp() * (ref - logp)).sum()}[direction]
    true_grad = torch.autograd.grad(kl, theta)[0]
    torch.testing.assert_close(expected_grad, true_grad, rtol=1e-10, atol=1e-12)
    assert direction is None or true_grad.abs().max() > 0.01


def test_gspo_uses_one_clipped_ratio_per_sequence():
    # Log-ratios per token: row 0 (A = +1) 0.3, 0.1, -0.1 -> mean 0.1, s = e^0.1 = 1.1052;
    # row 1 (A = -0.5) -0.4, -0.2 -> mean -0.3, s = e^-0.3 = 0.7408; row 2 (A = 2) all 0, s = 1.
    log_ratio = torch.tensor([[0.3, 0.1, -0.1, 5.0], [-0.4, -0.2, 9.0, 9.0], [0.0] * 4], dtype=F64)
    loss, metrics = policy_loss(LOGPROBS, LOGPROBS - log_ratio, None, ADVANTAGES, MASK, beta=0.0,
                                eps_low=0.2, eps_high=0.05, importance_sampling_level="sequence")
    # Clip range [0.8, 1.05]: row 0 min(1.1052, 1.05) * 1 = 1.05 (clipped);
    # row 1 min(0.7408 * -0.5, 0.8 * -0.5) = -0.4 (clipped); row 2: 1 * 2 = 2.
    # Every token of a row has the same term, so each sequence's mean is that term.
    expected = -(1.05 - 0.4 + 2.0) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # 3 + 2 of the 9 tokens are clipped; the ratios are the sequences' own.
    assert metrics["clip_frac"] == pytest.approx(5 / 9, rel=1e-12)
    assert metrics["ratio_min"] == pytest.approx(math.exp(-0.3), rel=1e-12)
    assert metrics["ratio_max"] == pytest.approx(math.exp(0.1), rel=1e-12)


def test_gspo_gradient_is_the_sequence_mean_of_the_token_gradients():
    # Unclipped, the term of row i is -A_i * s_i, and d s_i / d logp_{i,t} = s_i / |o_i|: with
    # the grpo mean over N = 3 rows, each real token's gradient is -A_i * s_i / (3 * |o_i|).
    log_ratio = torch.tensor([[0.3, 0.1, -0.1, 0.0], [-0.4, -0.2, 0.0, 0.0], [0.0] * 4],
                             dtype=F64)
    logprobs = LOGPROBS.clone().requires_grad_()
    loss, _ = policy_loss(logprobs, LOGPROBS - log_ratio, None, ADVANTAGES, MASK, beta=0.0,
                          eps_low=1e9, eps_high=1e9, importance_sampling_level="sequence")
    loss.backward()
    s = torch.tensor([math.exp(0.1), math.exp(-0.3), 1.0], dtype=F64)
    lengths = torch.tensor([3.0, 2.0, 4.0], dtype=F64)
    expected = (-ADVANTAGES * s / (3 * lengths)).unsqueeze(1) * MASK
    torch.testing.assert_close(logprobs.grad, expected, rtol=1e-12, atol=0)


def test_entropy_bonus_is_averaged_like_the_loss():
    # Ratio 1, beta 0: x = -(A_i + c * H_{i,t}), c = 0.1. grpo: each sequence's mean, then
    # the mean: -(1 + 0.1 * 0.6) and -(-0.5 + 0.1 * 1.5) and -(2 + 0.1 * 0.25), over 3.
    entropy = torch.tensor([[0.2, 0.6, 1.0, 9.0], [1.0, 2.0, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4]],
                           dtype=F64, requires_grad=True)
    loss, _ = policy_loss(LOGPROBS, LOGPROBS, None, ADVANTAGES, MASK, beta=0.0, entropy=entropy,
                          entropy_coef=0.1)
    expected = -((1 + 0.06) + (-0.5 + 0.15) + (2 + 0.025)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # d loss / d H_{i,t} = -c / (N * |o_i|) on real tokens, 0 on padding.
    loss.backward()
    lengths = torch.tensor([3.0, 2.0, 4.0], dtype=F64)
    torch.testing.assert_close(entropy.grad, (-0.1 / (3 * lengths)).unsqueeze(1) * MASK,
                               rtol=1e-12, atol=0)


def test_entropy_mask_keeps_the_kl_on_every_token():
    # M keeps only the first token of each row; beta 0.1 with log r = ln 2 on row 0's first
    # token and 0 elsewhere, so k3 = 1 - ln 2 there. dapo: the token sum over 9 tokens.
    keep = torch.zeros(3, 4, dtype=torch.bool)
    keep[:, 0] = True
    ref = LOGPROBS.clone()
    ref[0, 1] += LN2  # on a masked-out token: its KL still counts
    entropy = torch.ones(3, 4, dtype=F64)
    loss, _ = policy_loss(LOGPROBS, LOGPROBS, ref, ADVANTAGES, MASK, beta=0.1, loss_type="dapo",
                          entropy=entropy, entropy_coef=0.5, entropy_mask=keep)
    # Kept tokens: -(A_i + 0.5 * 1) for A = 1, -0.5, 2 -> -(1.5 + 0 + 2.5) = -4; KL 0.1 (1 - ln 2).
    expected = (-4.0 + 0.1 * (1 - LN2)) / 9
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_top_entropy_mask_keeps_tokens_at_or_above_the_quantile():
    # 9 real tokens with entropies 0.1..0.9; keep 0.2 -> the 0.8 quantile, linear between
    # order statistics: position 0.8 * 8 = 6.4, 0.7 + 0.4 * (0.8 - 0.7) = 0.74. Kept: 0.8, 0.9.
    entropy = torch.tensor([[0.5, 0.9, 0.1, 5.0], [0.7, 0.3, 5.0, 5.0], [0.2, 0.8, 0.6, 0.4]])
    kept = top_entropy_mask(entropy, MASK, keep=0.2)
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[0, 1] = expected[2, 1] = True  # the padding's 5.0 is never kept
    assert torch.equal(kept, expected)
    assert torch.equal(top_entropy_mask(entropy, MASK, keep=1.0), MASK.bool())


def test_sampler_gap_measures_mean_max_and_clipped_share():
    # Offsets training - sampler on the 9 real tokens: 0.3 (x2), -0.1, -0.3, 0 (x5); padding 7.
    offsets = torch.tensor([[0.3, 0.3, -0.1, 7.0], [-0.3, 0.0, 7.0, 7.0], [0.0] * 4], dtype=F64)
    gap = sampler_gap(LOGPROBS, LOGPROBS - offsets, MASK, eps_low=0.2, eps_high=0.28)
    # Mean |gap| = 1.0 / 9, max 0.3. e^0.3 = 1.35 > 1.28 and e^-0.3 = 0.74 < 0.8 clip;
    # e^-0.1 = 0.905 does not: 3 of 9.
    assert gap["logprob_gap"] == pytest.approx(1.0 / 9, rel=1e-12)
    assert gap["logprob_gap_max"] == pytest.approx(0.3, rel=1e-12)
    assert gap["gap_clip_frac"] == pytest.approx(3 / 9, rel=1e-12)


@pytest.mark.parametrize("length, expected", [
    (0, 0.0), (24, 0.0),  # up to max_length - buffer = 32 - 8: no penalty
    (25, -0.0625),  # 1 token into the buffer: -0.5 * 1 / 8
    (28, -0.25), (32, -0.5),  # half-way, and the whole penalty at the limit
    (40, -0.5),  # beyond the limit (DAPO's third case): the whole penalty
])
def test_overlong_penalty_falls_linearly_over_the_buffer(length, expected):
    assert rewards.overlong_penalty(length, max_length=32, buffer=8, factor=0.5) == expected
