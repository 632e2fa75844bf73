"""HFGenerate draws each token by inverting the row's CDF (relax_pl.rollout.sampling) instead of generate()'s
torch.multinomial: the same distribution after the same temperature, top-k and top-p, from other random numbers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from relax_pl.rollout import SamplingConfig, generate
from relax_pl.rollout.hf import generation_config
from relax_pl.rollout.sampling import InverseCDFSampler, sampling_processors

from test_prefix_sharing import prompts_of, tiny  # noqa: F401  (the fixture)


def test_draws_follow_the_tempered_top_k_top_p_distribution_by_hand():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, float("-inf")])  # the last one suppressed
    config = generation_config(SamplingConfig(temperature=0.5, top_k=4, top_p=0.95), stop_ids=[0], pad_id=0)
    decoding, processors = sampling_processors(config)
    assert not decoding.do_sample  # generate() only takes the argmax of what the processors return
    # by hand: logits / 0.5 = [4, 2, 1, 0, -2, -inf]; top-4 keeps tokens 0-3 with probabilities
    # e^[4, 2, 1, 0] / 65.70 = [.831, .112, .041, .015]; top-p 0.95 drops the smallest while the dropped mass stays
    # <= 0.05: token 3 (0.015) goes, token 2 (0.015 + 0.041 = 0.057) stays. Tokens 0-2 renormalised:
    expected = torch.tensor([math.e**4, math.e**2, math.e, 0, 0, 0]) / (math.e**4 + math.e**2 + math.e)

    rows = 200_000
    torch.manual_seed(0)
    scores = processors(torch.zeros(rows, 1, dtype=torch.long), logits.expand(rows, -1).clone())
    kept = scores == 0
    assert kept.sum(dim=1).eq(1).all() and torch.isneginf(scores[~kept]).all()  # one token per row, as argmax takes
    frequencies = torch.bincount(scores.argmax(dim=1), minlength=6) / rows
    # binomial standard error <= sqrt(.25 / 200k) = 0.0011; tokens 3-5 have probability zero and are never drawn
    torch.testing.assert_close(frequencies, expected.float(), atol=0.005, rtol=0)
    assert frequencies[3:].sum() == 0


def test_zero_probability_tokens_at_either_end_of_the_vocabulary_are_never_drawn():
    scores = torch.tensor([[float("-inf"), 0.0, 0.0, float("-inf")], [0.0, float("-inf"), float("-inf"), -30.0]])
    torch.manual_seed(0)
    drawn = torch.stack([InverseCDFSampler()(None, scores).argmax(dim=1) for _ in range(2000)])
    assert set(drawn[:, 0].tolist()) == {1, 2}
    assert set(drawn[:, 1].tolist()) <= {0, 3}


def test_greedy_decoding_is_left_to_generate():
    config = generation_config(SamplingConfig(temperature=0.7), stop_ids=[0], pad_id=0, greedy=True)
    decoding, processors = sampling_processors(config)
    assert decoding is config and len(processors) == 0


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_samples_through_the_processors(tiny, cache):  # noqa: F811
    """Through model.generate: top-k 1 leaves one token per step, so sampling gives the greedy responses; a
    temperature of 1 does not (the draws are random), and a seed repeats them."""
    model, tokenizer = tiny
    prompts, samples = prompts_of(tokenizer)
    greedy = generate(model, tokenizer, prompts, samples, SamplingConfig(num_responses=2, max_new_tokens=10),
                      greedy=True, cache=cache)
    top_1 = generate(model, tokenizer, prompts, samples,
                     SamplingConfig(num_responses=2, max_new_tokens=10, temperature=1.0, top_k=1), cache=cache)
    assert torch.equal(top_1.responses, greedy.responses)

    wide = SamplingConfig(num_responses=2, max_new_tokens=10, temperature=1.0)
    torch.manual_seed(5)
    first = generate(model, tokenizer, prompts, samples, wide, cache=cache)
    torch.manual_seed(5)
    again = generate(model, tokenizer, prompts, samples, wide, cache=cache)
    assert not torch.equal(first.responses, greedy.responses)
    assert torch.equal(first.responses, again.responses)


def test_a_full_generation_config_keeps_its_other_settings():
    config = GenerationConfig(do_sample=True, temperature=0.9, max_new_tokens=7, eos_token_id=[3, 4], pad_token_id=3,
                              suppress_tokens=[9], cache_implementation="static")
    decoding, _ = sampling_processors(config)
    assert (decoding.max_new_tokens, decoding.eos_token_id, decoding.suppress_tokens) == (7, [3, 4], [9])
    assert decoding.cache_implementation == "static" and config.do_sample  # the recipe's config is not changed
