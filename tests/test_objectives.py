import math

import pytest
import torch

from relax_pl import objectives as obj


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5])  # two groups of 3
    adv = obj.group_advantages(rewards, group_size=3, eps=0.0)
    # group 1: mean 1/3, unbiased std sqrt(((2/3)^2 + 2 (1/3)^2) / 2) = sqrt(1/3)
    std = math.sqrt(1 / 3)
    expected = [(2 / 3) / std, (-1 / 3) / std, (-1 / 3) / std]
    assert adv[:3].tolist() == pytest.approx(expected, rel=1e-6)
    # group 2: mean 2/3, rewards (1, .5, .5): deviations (1/3, -1/6, -1/6); std sqrt((1/9 + 2/36) / 2)
    std2 = math.sqrt((1 / 9 + 2 / 36) / 2)
    assert adv[3:].tolist() == pytest.approx([(1 / 3) / std2, (-1 / 6) / std2, (-1 / 6) / std2], rel=1e-6)


def test_group_advantages_uniform_group_is_zero_and_unscaled_is_centred():
    rewards = torch.tensor([1.0, 1.0, 0.0, 2.0])
    adv = obj.group_advantages(rewards, group_size=2)
    assert adv[:2].tolist() == [0.0, 0.0]
    assert obj.group_advantages(rewards, 2, scale=False).tolist() == [0.0, 0.0, -1.0, 1.0]
    assert obj.uniform_groups(rewards, 2).tolist() == [True, False]
    with pytest.raises(ValueError, match="groups of 3"):
        obj.group_advantages(rewards, 3)


def test_clipped_surrogate_hand_computed():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))  # ratios 1.5, 0.5, 1.0 against old_logp = 0
    old = torch.zeros(1, 3)
    loss_pos, stats_pos = obj.clipped_surrogate(logp, old, torch.tensor([2.0]), clip_low=0.2, clip_high=0.3)
    # A = 2: min(r A, clip(r, .8, 1.3) A) = min(3, 2.6), min(1, 1.6), min(2, 2) -> 2.6, 1, 2
    assert (-loss_pos).tolist()[0] == pytest.approx([2.6, 1.0, 2.0], rel=1e-6)
    assert stats_pos["clipped_high"].tolist() == [[True, False, False]]
    assert stats_pos["clipped_low"].tolist() == [[False, False, False]]
    loss_neg, stats_neg = obj.clipped_surrogate(logp, old, torch.tensor([-1.0]), clip_low=0.2, clip_high=0.3)
    # A = -1: min(-1.5, -1.3), min(-0.5, -0.8), min(-1, -1) -> -1.5, -0.8, -1
    assert (-loss_neg).tolist()[0] == pytest.approx([-1.5, -0.8, -1.0], rel=1e-6)
    assert stats_neg["clipped_low"].tolist() == [[False, True, False]]


def test_clipped_surrogate_gradient_vanishes_when_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_()
    loss, _ = obj.clipped_surrogate(logp, torch.zeros(1, 2), torch.tensor([1.0]), 0.2, 0.2)
    loss.sum().backward()
    assert logp.grad[0, 0] == 0.0  # ratio 1.5 > 1.2 with A > 0: clipped, no gradient
    assert logp.grad[0, 1] == pytest.approx(-1.1)  # d(-r)/dlogp = -r


@pytest.mark.parametrize(
    "estimator, expected",
    [
        ("k1", lambda d: d),
        ("k2", lambda d: 0.5 * d * d),
        ("k3", lambda d: math.exp(-d) + d - 1),
    ],
)
def test_kl_estimators(estimator, expected):
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    out = obj.kl_penalty(logp, ref, estimator)
    deltas = (logp - ref)[0].tolist()
    assert out[0].tolist() == pytest.approx([expected(d) for d in deltas], rel=1e-6)


def test_k3_is_nonnegative_and_unbiased():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)
    q = torch.softmax(torch.randn(6), 0)
    samples = torch.multinomial(p, 200_000, replacement=True)
    k3 = obj.kl_penalty(p.log()[samples], q.log()[samples], "k3")
    assert (k3 >= 0).all()
    true_kl = float((p * (p.log() - q.log())).sum())
    assert float(k3.mean()) == pytest.approx(true_kl, rel=0.03)
    with pytest.raises(ValueError, match="k4"):
        obj.kl_penalty(p, q, "k4")


def test_aggregation_modes():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(obj.aggregate(values, mask, "token-mean")) == pytest.approx(10 / 4)
    assert float(obj.aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx((2 + 4) / 2)
    # micro-batches normalised by the mini-batch count add up to the mini-batch loss
    halves = [obj.aggregate(values[i : i + 1], mask[i : i + 1], "token-mean", normaliser=4) for i in range(2)]
    assert float(sum(halves)) == pytest.approx(10 / 4)
    with pytest.raises(ValueError, match="sum"):
        obj.aggregate(values, mask, "sum")


def test_token_logprobs_and_entropy_match_full_softmax_and_gradients():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    tokens = torch.randint(0, 11, (3, 5))
    logp, entropy = obj.token_logprobs_and_entropy(hidden, tokens, head, temperature=0.7, chunk_size=4)
    logits = head(hidden) / 0.7
    full = torch.log_softmax(logits, -1)
    expected_logp = full.gather(-1, tokens[..., None]).squeeze(-1)
    expected_entropy = -(full.exp() * full).sum(-1)
    torch.testing.assert_close(logp, expected_logp)
    torch.testing.assert_close(entropy, expected_entropy)
    (grad_chunked,) = torch.autograd.grad(logp.sum(), hidden)
    (grad_full,) = torch.autograd.grad(expected_logp.sum(), hidden)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_clip_cov_detaches_only_selected_tokens():
    torch.manual_seed(0)
    logp = torch.randn(4, 6).requires_grad_()
    mask = torch.ones(4, 6, dtype=torch.bool)
    adv = torch.tensor([3.0, -3.0, 2.0, -2.0])
    selected = obj.clip_cov_selection(logp, logp.detach(), adv, mask, 0.2, 0.2, clip_ratio=0.2, cov_bounds=(-1e9, 1e9))
    loss, stats = obj.clip_cov_surrogate(logp, logp.detach(), adv, 0.2, 0.2, selected)
    loss.sum().backward()
    assert int(selected.sum()) == 4  # 20% of 24 tokens
    assert torch.equal(stats["cov_selected"], selected)
    assert (logp.grad[selected] == 0).all() and (logp.grad[~selected] != 0).all()


def test_clip_cov_never_spends_its_budget_on_tokens_the_clip_already_zeroed():
    """Tokens whose ratio the PPO clip cuts (no gradient anyway) are not candidates, as in the reference code: the
    whole budget goes to tokens that still have a gradient."""
    generator = torch.Generator().manual_seed(1)
    old = torch.randn(8, 10, generator=generator)
    logp = old + 0.5 * torch.randn(8, 10, generator=generator)  # many ratios outside [0.8, 1.2]
    adv = torch.tensor([1.0, -1.0] * 4)
    mask = torch.ones(8, 10, dtype=torch.bool)
    _, clip = obj.clipped_surrogate(logp, old, adv, 0.2, 0.2)
    clipped = clip["clipped_low"] | clip["clipped_high"]
    assert clipped.sum() > 20
    for seed in range(20):
        selected = obj.clip_cov_selection(
            logp, old, adv, mask, 0.2, 0.2, clip_ratio=0.25, cov_bounds=(-1e9, 1e9),
            generator=torch.Generator().manual_seed(seed),
        )
        assert int(selected.sum()) == 20 and not (selected & clipped).any()


def test_kl_cov_penalises_the_top_covariance_tokens():
    logp = torch.tensor([[-0.1, -3.0], [-0.2, -2.5]]).requires_grad_()
    old = logp.detach() - 0.1
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2, dtype=torch.bool)
    selected = obj.kl_cov_selection(logp, adv, mask, kl_ratio=0.25)
    loss, stats = obj.kl_cov_surrogate(logp, old, adv, selected, kl_coef=1.0)
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
    whole = obj.kl_cov_selection(logp, adv, mask, kl_ratio=0.125)
    parts = torch.cat([obj.kl_cov_selection(logp[r], adv[r], mask[r], kl_ratio=0.125) for r in ([0, 1, 2], [3, 4, 5])])
    assert int(whole.sum()) == 6 and not torch.equal(whole, parts)
    scores = obj.covariance_scores(logp, adv, mask)
    assert torch.equal(whole.flatten(), torch.zeros(48, dtype=torch.bool).index_fill(0, scores.flatten().topk(6).indices, True))
