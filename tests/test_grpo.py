"""The GRPO math against values worked out by hand (float64 so comparisons can be tight)."""

import math

import pytest
import torch

from grpo import group_advantages, kl_estimate, policy_loss

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
