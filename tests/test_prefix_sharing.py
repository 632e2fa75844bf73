"""Speed paths that must not change results: each prompt encoded once for all its responses (before decoding
and in the training forward), the static-cache HFGenerate, and reference log-probs computed only for
the rows a callback asks for."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from relax_pl import forward as forward_lib
from relax_pl.config import UpdateConfig
from relax_pl.forward import ResponseForward
from relax_pl.models import load_causal_lm, load_tokenizer
from relax_pl.module import RLVRModule
from relax_pl.rollout import hf as rollout_lib
from relax_pl.rollout import SamplingConfig, generate
from relax_pl.setups import SingleDevice, enable_gradient_checkpointing
from relax_pl.testing import save_tiny_model

# different lengths, so rows are left-padded differently
QUESTIONS = ["What is 3 + 5?", "Compute 7 * 2 - 2, step by step, and put the answer in \\boxed{}.", "Hi"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2"))
    model = load_causal_lm(folder)
    # wider weights than the init's: the tiny model's greedy tokens then depend on the prompt
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    return model, load_tokenizer(folder)


def prompts_of(tokenizer) -> tuple[list[str], list[dict]]:
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    return prompts, [{"row": i, "source": "test"} for i in range(len(prompts))]


def sampled_rollout(tiny, seed: int):
    """The tiny model, three responses sampled for each question (temperature 0.9), and their sampling config."""
    model, tokenizer = tiny
    prompts, samples = prompts_of(tokenizer)
    sampling = SamplingConfig(num_responses=3, max_new_tokens=12, temperature=0.9)
    torch.manual_seed(seed)
    return model, sampling, generate(model, tokenizer, prompts, samples, sampling)


def counting(monkeypatch, namespace) -> list[int]:
    calls: list[int] = []
    original = rollout_lib.shared_prefix_cache

    def spy(model, input_ids, *args):
        calls.append(input_ids.shape[0])
        return original(model, input_ids, *args)

    monkeypatch.setattr(namespace, "shared_prefix_cache", spy)
    return calls


def test_shared_prefill_and_static_cache_decode_the_same_greedy_tokens(tiny, monkeypatch):
    model, tokenizer = tiny
    prompts, samples = prompts_of(tokenizer)
    sampling = SamplingConfig(num_responses=3, max_new_tokens=12)
    calls = counting(monkeypatch, rollout_lib)
    shared = generate(model, tokenizer, prompts, samples, sampling, greedy=True)
    assert calls == [3]  # three distinct prompts encoded once, for nine responses
    # every copy as a prompt of its own: nothing is shared
    plain = generate(
        model, tokenizer, [p for p in prompts for _ in range(3)], [s for s in samples for _ in range(3)], sampling,
        greedy=True, num_responses=1,
    )
    static = generate(model, tokenizer, prompts, samples, sampling, greedy=True, cache="static")
    assert calls == [3]
    responses = shared.responses[::3]
    assert shared.response_mask.sum(-1).min() >= 2  # real responses, not an immediate stop
    assert not torch.equal(responses[0], responses[1]) and not torch.equal(responses[1], responses[2])
    assert torch.equal(shared.input_ids, plain.input_ids)
    assert torch.equal(shared.response_mask, plain.response_mask)
    assert torch.equal(static.input_ids, plain.input_ids)


def test_shared_prefix_forward_matches_the_full_forward(tiny, monkeypatch):
    model, sampling, rollout = sampled_rollout(tiny, seed=0)
    module = RLVRModule(setup=SingleDevice(), sampling=sampling)
    rows = torch.tensor([4, 0, 5, 1, 8])  # parts of three groups, out of order
    calls = counting(monkeypatch, forward_lib)

    def forward_and_grads():
        model.zero_grad(set_to_none=True)
        logp, entropy, mask, hidden, _ = module.response_forward(model, rollout, rows, keep_hidden=True)
        ((logp * mask).sum() + (entropy * mask).sum() + hidden.square().mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return logp.detach(), entropy.detach(), mask, hidden.detach(), grads

    shared = forward_and_grads()
    assert calls == [3]
    monkeypatch.setattr(ResponseForward, "shares_prompt_prefix", lambda *args: False)
    full = forward_and_grads()
    assert calls == [3]
    for a, b in zip(shared[:4], full[:4]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for name, grad in full[4].items():  # float32 rounding: up to ~5e-6 on entries near zero of a gradient of ~20
        scale = float(grad.abs().max())
        torch.testing.assert_close(shared[4][name], grad, rtol=1e-4, atol=1e-6 * max(scale, 1.0), msg=name)


def test_gradient_checkpointing_shares_the_prefix_only_without_grad(tiny, monkeypatch):
    model, sampling, rollout = sampled_rollout(tiny, seed=1)
    rows = torch.arange(len(rollout))
    with torch.no_grad():
        expected = RLVRModule(setup=SingleDevice(), sampling=sampling).response_forward(model, rollout, rows)[0]
    module = RLVRModule(setup=SingleDevice(gradient_checkpointing=True), sampling=sampling)
    calls = counting(monkeypatch, forward_lib)
    enable_gradient_checkpointing(model)
    model.train()  # HF checkpoints only in training mode
    try:
        # with grad, checkpointed layers would drop a cache: the whole sequence runs through the forward
        with_grad = module.response_forward(model, rollout, rows)[0]
        assert calls == []
        with torch.no_grad():  # reference and old-policy log-probs: nothing is replayed, the prefix is shared
            without_grad = module.response_forward(model, rollout, rows)[0]
        assert calls == [3]
    finally:
        model.gradient_checkpointing_disable()
        model.eval()
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(without_grad, expected, rtol=1e-4, atol=1e-5)


def test_caches_draw_the_same_samples_from_the_same_seed(tiny):
    """Same sampling semantics: temperature, top-k and top-p filter the same distributions, drawn in the same
    order, so one seed gives the same responses with either cache."""
    model, tokenizer = tiny
    prompts, samples = prompts_of(tokenizer)
    sampling = SamplingConfig(num_responses=4, max_new_tokens=12, temperature=0.8, top_p=0.9, top_k=20)
    drawn = {}
    for cache in ("dynamic", "static"):
        torch.manual_seed(3)
        drawn[cache] = generate(model, tokenizer, prompts, samples, sampling, cache=cache)
    responses = drawn["dynamic"].responses
    assert not all(torch.equal(responses[0], row) for row in responses[1:4])  # sampled, not greedy
    assert torch.equal(drawn["static"].input_ids, drawn["dynamic"].input_ids)
    assert torch.equal(drawn["static"].response_mask, drawn["dynamic"].response_mask)


def test_reference_kl_of_selected_rows_equals_the_up_front_kl(tiny, monkeypatch):
    model, sampling, rollout = sampled_rollout(tiny, seed=0)
    reference = copy.deepcopy(model)
    with torch.no_grad():  # a reference that differs from the policy
        for p in reference.parameters():
            p.mul_(0.9)
    module = RLVRModule(setup=SingleDevice(), sampling=sampling, update=UpdateConfig(micro_batch_size=2))
    module.policy, module._reference[0] = model, reference
    rows = torch.tensor([4, 0, 5, 1, 8])  # a micro-batch of rows from three groups
    logp = module.response_forward(model, rollout, rows)[0]
    selected = torch.tensor([True, False, False, True, True])
    reference_rows = []
    forward = ResponseForward.__call__

    def spy(self, model, rollout, rows, *args, **kwargs):
        if model is reference:
            reference_rows.extend(rows.tolist())
        return forward(self, model, rollout, rows, *args, **kwargs)

    monkeypatch.setattr(ResponseForward, "__call__", spy)
    lazy = module.reference_kl(rollout, rows, logp)(selected)
    assert sorted(reference_rows) == [1, 4, 8]  # the selected rows only
    # a second PPO epoch over the same rows runs the reference only for rows it had not selected before
    again = module.reference_kl(rollout, rows, logp)(torch.tensor([True, True, False, False, True]))
    assert sorted(reference_rows) == [0, 1, 4, 8]
    torch.testing.assert_close(again[[0, 2]], lazy[[0, 2]])
    assert module.reference_kl(rollout, rows, logp)(torch.zeros(5, dtype=torch.bool)).shape == (0, logp.shape[1])
    up_front_rollout = replace(rollout, ref_logp=module.reference_logprobs(rollout, torch.arange(len(rollout))))
    up_front = module.reference_kl(up_front_rollout, rows, logp)(selected)
    mask = rollout.response_mask[rows[selected], : logp.shape[1]]
    assert lazy.shape == up_front.shape == (3, logp.shape[1])
    assert float((up_front * mask).sum()) > 1e-3  # the two policies differ
    torch.testing.assert_close(lazy, up_front, rtol=1e-4, atol=1e-5)
