"""The policy losses (relax_pl.losses), each against values computed by hand: PPO-clip, Clip-Cov, KL-Cov, GSPO,
CISPO and Dr. GRPO, their statistics, and the hooks the module calls (select over the mini-batch, check of the update plan)."""

import math

import pytest
import torch

from relax_pl.config import ObjectiveConfig
from relax_pl.losses import CISPO, GSPO, ClipCov, DrGRPO, KLCov, LossInput, PPOClip, UpdatePlan
from relax_pl.losses.cispo import clipped_weight_surrogate
from relax_pl.losses.clip_cov import clip_cov_selection, clip_cov_surrogate
from relax_pl.losses.gspo import sequence_ratio_surrogate
from relax_pl.losses.kl_cov import drift_magnitude, kl_cov_selection, kl_cov_surrogate
from relax_pl.losses.ppo import clipped_surrogate
from relax_pl.objectives import aggregate, covariance_scores


# ------------------------------------------------------------------------------------------------ PPO-clip
def test_clipped_surrogate_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old_logp = 0
    old = torch.zeros(1, 3)
    loss_pos, stats_pos = clipped_surrogate(logp, old, torch.tensor([2.0]), clip_low=0.2, clip_high=0.3)
    # A = 2: min(r A, clip(r, .8, 1.3) A) = min(3, 2.6), min(1, 1.6), min(2, 2) -> 2.6, 1, 2
    assert (-loss_pos).tolist()[0] == pytest.approx([2.6, 1.0, 2.0], rel=1e-6)
    assert stats_pos["clipped_high"].tolist() == [[True, False, False]]
    assert stats_pos["clipped_low"].tolist() == [[False, False, False]]
    loss_neg, stats_neg = clipped_surrogate(logp, old, torch.tensor([-1.0]), clip_low=0.2, clip_high=0.3)
    # A = -1: min(-1.5, -1.3), min(-0.5, -0.8), min(-1, -1) -> -1.5, -0.8, -1
    assert (-loss_neg).tolist()[0] == pytest.approx([-1.5, -0.8, -1.0], rel=1e-6)
    assert stats_neg["clipped_low"].tolist() == [[False, True, False]]


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad[0, 0] == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped, no gradient
    assert logp.grad[0, 1] == pytest.approx(-1.1)  # d(-r)/dlogp = -r


def test_clip_cov_detaches_only_selected_tokens():
    torch.manual_seed(0)
    logp = torch.randn(4, 6).requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.bool)
    adv = torch.tensor([3.0, -3.0, 2.0, -2.0])
    selected = clip_cov_selection(logp, logp.detach(), adv, mask, 0.2, 0.2, clip_ratio=0.2, cov_bounds=(-1e9, 1e9))
    loss, _ = clip_cov_surrogate(logp, logp.detach(), adv, 0.2, 0.2, selected)
    loss.sum().backward()
    assert int(selected.sum()) == 4  # 20% of 24 tokens
    assert (logp.grad[selected] == 0).all() and (logp.grad[~selected] != 0).all()


def test_clip_cov_never_spends_its_budget_on_tokens_the_clip_already_zeroed():
    """Tokens whose ratio the PPO clip cuts (no gradient anyway) are not candidates, as in the reference code: the
    whole budget goes to tokens that still have a gradient."""
    generator = torch.Generator().manual_seed(1)
    old = torch.randn(8, 10, generator=generator)
    logp = old + 0.5 * torch.randn(8, 10, generator=generator)  # many ratios outside [0.8, 1.2]
    adv = torch.tensor([1.0, -1.0] * 4)
    mask = torch.ones(8, 10, dtype=torch.bool)
    _, clip = clipped_surrogate(logp, old, adv, 0.2, 0.2)
    clipped = clip["clipped_low"] | clip["clipped_high"]
    assert clipped.sum() > 20
    for seed in range(20):
        selected = clip_cov_selection(
            logp, old, adv, mask, 0.2, 0.2, clip_ratio=0.25, cov_bounds=(-1e9, 1e9),
            generator=torch.Generator().manual_seed(seed),
        )
        assert int(selected.sum()) == 20 and not (selected & clipped).any()


def test_kl_cov_penalises_the_top_covariance_tokens():
    logp = torch.tensor([[-0.1, -3.0], [-0.2, -2.5]]).requires_grad_()
    old = logp.detach() - 0.1
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    selected = kl_cov_selection(logp, adv, mask, kl_ratio=0.25)
    loss = kl_cov_surrogate(logp, old, adv, selected, kl_coef=1.0)
    # covariance: (lp - mean lp)(A - mean A); mean lp = -1.45, mean A = 0 -> row 0 tok 0: 1.35 (largest)
    assert selected.tolist() == [[True, False], [False, False]]
    ratio = math.exp(0.1)
    assert float(loss[0, 0]) == pytest.approx(-ratio * 1.0 + 0.1, rel=1e-5)
    assert float(loss[1, 1]) == pytest.approx(ratio * 1.0, rel=1e-5)


def test_covariance_selections_are_over_the_whole_mini_batch():
    """Centring, budget and top-k over the mini-batch: the selection of a mini-batch is not the union of its
    micro-batches' selections (which is what a per-micro-batch computation would give)."""
    generator = torch.Generator().manual_seed(2)
    logp = torch.randn(6, 8, generator=generator) - torch.arange(6)[:, None].float()
    adv = torch.tensor([2.0, 1.0, 0.5, -0.5, -1.0, -2.0])
    mask = torch.ones(6, 8, dtype=torch.bool)
    whole = kl_cov_selection(logp, adv, mask, kl_ratio=0.125)
    parts = torch.cat([kl_cov_selection(logp[r], adv[r], mask[r], kl_ratio=0.125) for r in ([0, 1, 2], [3, 4, 5])])
    assert int(whole.sum()) == 6 and not torch.equal(whole, parts)
    scores = covariance_scores(logp, adv, mask)
    assert torch.equal(whole.flatten(), torch.zeros(48, dtype=torch.bool).index_fill(0, scores.flatten().topk(6).indices, True))


def test_ppo_clip_logs_its_clip_fractions_and_nothing_else():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0, 1.0]]))
    mask = torch.tensor([[True, True, True, False]])
    out = PPOClip(clip_low=0.2, clip_high=0.3)(LossInput(logp, torch.zeros(1, 4), torch.tensor([2.0]), mask))
    assert set(out.metrics) == {"actor/pg_clipfrac_low", "actor/pg_clipfrac_high", "actor/pg_clipfrac"}
    assert float(out.metrics["actor/pg_clipfrac_high"]) == pytest.approx(1 / 3)  # ratio 1.5 of three tokens
    assert float(out.metrics["actor/pg_clipfrac"]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------------------------ Clip-Cov, KL-Cov
def test_covariance_losses_choose_in_select_and_act_in_call():
    logp = torch.tensor([[-0.1, -3.0], [-0.2, -2.5]]).requires_grad_()
    old, adv, mask = logp.detach() - 0.1, torch.tensor([1.0, -1.0]), torch.ones(2, 2, dtype=torch.bool)
    batch = LossInput(logp.detach(), old, adv, mask)
    loss = KLCov(ratio=0.25, coef=1.0)
    assert loss.selects_tokens and ClipCov().selects_tokens and not PPOClip().selects_tokens
    batch.selected = loss.select(batch)
    assert batch.selected.tolist() == [[True, False], [False, False]]
    out = loss(LossInput(logp, old, adv, mask, batch.selected))
    assert float(out.per_token[0, 0]) == pytest.approx(-math.exp(0.1) + 0.1, rel=1e-5)
    assert set(out.metrics) == {"actor/cov_selected_frac"}  # no placeholder clip fractions
    assert float(out.metrics["actor/cov_selected_frac"]) == pytest.approx(0.25)


def test_kl_cov_refuses_an_update_that_never_leaves_the_sampling_policy():
    with pytest.raises(ValueError, match="ppo_epochs >= 2.*mini_batch_size"):
        KLCov().check(UpdatePlan(ppo_epochs=1, mini_batch_size=None, responses_per_step=16))
    with pytest.raises(ValueError, match="ppo_epochs >= 2"):
        KLCov().check(UpdatePlan(ppo_epochs=1, mini_batch_size=16, responses_per_step=16))
    KLCov().check(UpdatePlan(ppo_epochs=2, mini_batch_size=None, responses_per_step=16))
    KLCov().check(UpdatePlan(ppo_epochs=1, mini_batch_size=8, responses_per_step=16))
    PPOClip().check(UpdatePlan(ppo_epochs=1, mini_batch_size=None, responses_per_step=16))


# ------------------------------------------------------------------------------------------------ GSPO
def test_gspo_sequence_ratio_hand_computed():
    """Two responses, old log-probs 0. Row 0: mean log-ratio 0.1 (s = e^0.1, above 1 + 4e-4) with A = 1: clipped,
    every token's loss -(1 + 4e-4), no gradient. Row 1: mean log-ratio 3e-4 over its two tokens (the padding's 5.0
    is not counted; s = e^3e-4, inside the range) with A = -2: loss 2 s per token, gradient 2 s per token before
    aggregation. seq-mean-token-mean over the two responses: ((-1.0004) + 2 s) / 2, and d/dlogp_1t = 2 s / 2 / 2."""
    logp = torch.tensor([[0.3, -0.1, 0.1], [0.0002, 0.0004, 5.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss = GSPO(clip_low=3e-4, clip_high=4e-4)
    assert loss.aggregation == "seq-mean-token-mean"
    out = loss(LossInput(logp, old, adv, mask))
    s1 = math.exp(3e-4)
    torch.testing.assert_close(out.per_token[0], torch.full((3,), -1.0004, dtype=torch.float64))
    torch.testing.assert_close(out.per_token[1, :2], torch.full((2,), 2 * s1, dtype=torch.float64))
    total = aggregate(out.per_token, mask, "seq-mean-token-mean")
    assert float(total) == pytest.approx((-1.0004 + 2 * s1) / 2, rel=1e-12)
    total.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 0.0], [s1 / 2, s1 / 2, 0.0]], dtype=torch.float64))
    assert float(out.metrics["actor/pg_clipfrac_high"]) == pytest.approx(3 / 5)  # row 0's three of five tokens


def test_gspo_token_form_has_the_sequence_objectives_gradient():
    """GSPO-token reduced seq-mean-token-mean equals -(1/G) sum_i min(s_i A_i, clip(s_i) A_i) (Eq. 5), in value and
    gradient, for random ratios near 1."""
    generator = torch.Generator().manual_seed(0)
    old = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    logp = (old + 1e-4 * torch.randn(4, 6, generator=generator, dtype=torch.float64)).requires_grad_()
    mask = torch.arange(6)[None, :] < torch.tensor([6, 4, 2, 5])[:, None]
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    per_token, _ = sequence_ratio_surrogate(logp, old, adv, mask, 3e-4, 4e-4)
    token_form = aggregate(per_token, mask, "seq-mean-token-mean")
    (grad_token,) = torch.autograd.grad(token_form, logp)
    s = torch.exp(((logp - old) * mask).sum(-1) / mask.sum(-1))
    sequence = -torch.minimum(s * adv, s.clamp(1 - 3e-4, 1 + 4e-4) * adv).mean()
    (grad_sequence,) = torch.autograd.grad(sequence, logp)
    torch.testing.assert_close(token_form, sequence)
    torch.testing.assert_close(grad_token, grad_sequence)


# ------------------------------------------------------------------------------------------------ CISPO
def test_cispo_hand_computed_keeps_every_tokens_gradient():
    """Ratios 1.5, 0.5, 1 against old log-probs 0, A = 2, clip_high 0.28 and no lower bound: weights 1.28, 0.5, 1.
    Loss -w A logp per token; gradient -w A, also where the weight was clipped (PPO would give 0 there)."""
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]], dtype=torch.float64)).requires_grad_()
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = CISPO(clip_high=0.28)(LossInput(logp, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([2.0]), mask))
    expected = [-1.28 * 2 * math.log(1.5), -0.5 * 2 * math.log(0.5), 0.0]
    assert out.per_token[0].tolist() == pytest.approx(expected, rel=1e-12)
    out.per_token.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2.56, -1.0, -2.0], rel=1e-12)
    assert float(out.metrics["actor/is_weight_clipfrac"]) == pytest.approx(1 / 3)
    _, clipped = clipped_weight_surrogate(logp.detach(), torch.zeros(1, 3), torch.tensor([2.0]), 0.2, 0.28)
    assert clipped.tolist() == [[True, True, False]]  # with a lower bound 0.8 the 0.5 is clipped too


# ------------------------------------------------------------------------------------------------ Dr. GRPO
def test_dr_grpo_declares_its_reduction_and_unscaled_advantages():
    """DrGRPO needs no objective keys: it brings seq-mean-token-sum-norm and centred-only advantages; a recipe that
    asks for GRPO's normalisations with it is refused, naming the key."""
    objective = ObjectiveConfig(policy_loss=DrGRPO())
    assert objective.aggregation == "seq-mean-token-sum-norm" and objective.advantages_scaled is False
    assert ObjectiveConfig().aggregation == "token-mean" and ObjectiveConfig().advantages_scaled is True
    assert ObjectiveConfig(scale_advantages=False).advantages_scaled is False  # any loss may be run unscaled
    with pytest.raises(ValueError, match="model.objective.loss_agg=token-mean conflicts"):
        ObjectiveConfig(policy_loss=DrGRPO(), loss_agg="token-mean")
    with pytest.raises(ValueError, match="model.objective.scale_advantages=True conflicts"):
        ObjectiveConfig(policy_loss=DrGRPO(), scale_advantages=True)
    # PPO's clipped surrogate per token, as PPOClip's
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    batch = LossInput(logp, torch.zeros(1, 3), torch.tensor([2.0]), torch.ones(1, 3, dtype=torch.bool))
    assert torch.equal(DrGRPO()(batch).per_token, PPOClip()(batch).per_token)


def test_kl_cov_penalty_has_no_gradient_on_rounding_noise():
    """|logp - old_logp| pushes by sign(drift): on a drift of a few ulps that sign is noise (a forward split into
    other micro-batches flips it), so the gradient there is 0; the value, and the gradient of a real drift, stay."""
    drift = torch.tensor([1e-15, -1e-15, 0.0, 1e-3, -1e-3], dtype=torch.float64, requires_grad=True)
    value = drift_magnitude(drift)
    value.sum().backward()
    assert torch.equal(value.detach(), drift.detach().abs())
    assert drift.grad.tolist() == [0.0, 0.0, 0.0, 1.0, -1.0]
