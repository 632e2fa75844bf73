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


def test_seq_mean_token_sum_norm_divides_by_responses_and_the_token_budget():
    """Dr. GRPO's reduction: (1/N) sum_i sum_t v_it / L. A response's tokens are summed, not averaged, so each token of
    a long response pulls as hard as one of a short response; micro-batch shares add up to the mini-batch's."""
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    assert float(obj.aggregate(values, mask, "seq-mean-token-sum-norm", token_budget=5)) == pytest.approx(10 / (2 * 5))
    halves = [obj.aggregate(values[i : i + 1], mask[i : i + 1], "seq-mean-token-sum-norm", 2, 5) for i in range(2)]
    assert float(sum(halves)) == pytest.approx(10 / (2 * 5))
    logp = torch.zeros(2, 3, requires_grad=True)
    obj.aggregate(-logp, mask, "seq-mean-token-sum-norm", token_budget=5).backward()
    assert logp.grad[mask].tolist() == pytest.approx([-0.1] * 4)  # the same on every token, long response or short
    with pytest.raises(ValueError, match="token_budget"):
        obj.aggregate(values, mask, "seq-mean-token-sum-norm")


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
    weights = torch.randn(2, 3, 5)  # both outputs in the loss, as with an entropy bonus
    (grad_chunked,) = torch.autograd.grad((weights[0] * logp + weights[1] * entropy).sum(), hidden)
    (grad_full,) = torch.autograd.grad((weights[0] * expected_logp + weights[1] * expected_entropy).sum(), hidden)
    torch.testing.assert_close(grad_chunked, grad_full)


def test_the_written_out_logprob_entropy_backward_is_the_derivative():
    torch.manual_seed(0)
    logits = (torch.randn(6, 9, dtype=torch.float64) * 3).requires_grad_()
    tokens = torch.randint(0, 9, (6,))
    assert torch.autograd.gradcheck(lambda z: obj.LogprobEntropy.apply(z, tokens), (logits,))
    # only one of the two outputs used: the other's gradient arrives as zeros
    (grad,) = torch.autograd.grad(obj.LogprobEntropy.apply(logits, tokens)[1].sum(), logits)
    log_p = torch.log_softmax(logits, -1)
    (expected,) = torch.autograd.grad(-(log_p.exp() * log_p).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_group_advantages_keep_the_rewards_dtype():
    rewards = torch.tensor([0.1, 0.2, 0.7, 1e-9, 0.0, 0.0], dtype=torch.float64)
    advantages = obj.group_advantages(rewards, 3)
    assert advantages.dtype == torch.float64
    # 1e-9 survives in float64 (float32 keeps it too, but not next to 1.0: the point is no rounding to float32)
    expected = (rewards[3:] - rewards[3:].mean()) / (rewards[3:].std() + 1e-6)
    assert torch.equal(advantages[3:], expected)
    assert obj.group_advantages(torch.tensor([0, 1, 1, 0]), 2).dtype == torch.float32  # integers become float32


def test_k3_is_capped_as_verl_caps_it():
    # ref - logp = 5: k3 = e^5 - 5 - 1 = 142.4, capped at 10 as verl's low_var_kl is; below the cap, unchanged
    logp = torch.tensor([-6.0, -1.0], requires_grad=True)
    k3 = obj.kl_penalty(logp, torch.tensor([-1.0, -1.5]), "k3")
    assert k3[0].item() == obj.K3_CAP == 10.0
    assert k3[1].item() == pytest.approx(math.exp(-0.5) + 0.5 - 1)
    k3.sum().backward()
    assert logp.grad[0] == 0 and logp.grad[1] != 0
