"""The rollout seam (``model.rollout``), transformers' continuous batching, and the truncated importance-sampling
correction, in the main environment.

The real vLLM engine is tested in ``test_vllm.py``, which runs in the environment ``scripts/bootstrap_vllm.sh``
builds; here: the module talks to its engine only through the seam, the correction's arithmetic, and the start-up
errors of an engine that cannot run.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import replace

import lightning as L
import pytest
import torch

from relax_pl.cli import main
from relax_pl.correction import truncated_importance_weights
from relax_pl.config import UpdateConfig
from relax_pl.extension import MiniBatch
from relax_pl.module import RLVRModule
from relax_pl.data.prompts import load_processing
from relax_pl.models import load_causal_lm
from relax_pl.rollout import VLLM, HFContinuousBatching, HFGenerate, RolloutContext, SamplingConfig
from relax_pl.vision import VisionConfig
from relax_pl.testing import save_tiny_model, save_tiny_vl_model

from probes import hf_generate, tiny_recipe


class RecordingEngine(HFGenerate):
    """HFGenerate that counts the module's calls through the seam."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"setup": 0, "generate": 0, "policy_updated": 0}

    def setup(self, context) -> None:
        super().setup(context)
        self.calls["setup"] += 1

    def generate(self, prompts, samples, sampling, greedy=False):
        self.calls["generate"] += 1
        return super().generate(prompts, samples, sampling, greedy)

    def policy_updated(self) -> None:
        self.calls["policy_updated"] += 1


def test_the_module_reaches_its_engine_only_through_the_seam(tmp_path, tiny_model):
    """Two RL steps of two PPO epochs over two mini-batches: 2 rollouts and 8 optimiser steps, each announced."""
    recipe = tiny_recipe(
        tmp_path, tiny_model, logger=False,
        model={
            "rollout": {"class_path": "test_rollout_engines.RecordingEngine"},
            "update": {"micro_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
        },
        trainer={"max_steps": 8},
    )
    cli = main(["fit", "--config", str(recipe)])
    assert cli.model.rollout_engine.calls == {"setup": 1, "generate": 2, "policy_updated": 8}


def test_engines_run_on_their_context_alone(tiny_model, monkeypatch):
    """HFGenerate and HFContinuousBatching sample from a RolloutContext built by hand (building an RLVRModule here
    fails the test): the same greedy responses, in the rollout layout."""

    def no_module(*args, **kwargs):
        raise AssertionError("an engine's test built an RLVRModule")

    monkeypatch.setattr(RLVRModule, "__init__", no_module)
    tokenizer, family, processor = load_processing(str(tiny_model), VisionConfig(), None, False)
    context = RolloutContext(tokenizer=tokenizer, policy=load_causal_lm(str(tiny_model)), family=family)
    prompts = ["What is 1 + 1?", "What is 2 + 3?"]
    samples = [{"row": i, "source": "t"} for i in range(2)]
    sampling = SamplingConfig(num_responses=3, max_new_tokens=6)
    rollouts = []
    for engine in (HFGenerate(), HFContinuousBatching()):
        engine.check(context)
        engine.setup(context)
        rollouts.append(engine.generate(prompts, samples, sampling, greedy=True))
    for rollout in rollouts:
        assert len(rollout) == 6 and rollout.group_size == 3 and rollout.samples[3] == samples[1]
        assert rollout.response_mask.sum() > 0
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    with pytest.raises(ValueError, match="lockstep"):
        HFContinuousBatching().check(replace(context, lockstep=True))


def test_sync_check_bound_and_modes():
    """VLLM's decision on a measured gap (no engine needed): within the bound nothing happens; above it "error"
    raises naming the engine, the step and the gap, "warn" warns, "off" checks nothing; the default bound follows
    the engine's dtype."""
    from relax_pl.rollout import WeightSyncError

    def engine(**init_args) -> VLLM:
        vllm = VLLM(**init_args)
        vllm.context = RolloutContext(tokenizer=None, dtype="float32", step=lambda: 7)
        return vllm

    engine().check_gap(5e-4, "the sync probe")  # float32's default bound is 1e-3
    with pytest.raises(WeightSyncError, match=r"VLLM does not serve .* optimiser step 7: .* sync probe is 0.002 "):
        engine().check_gap(2e-3, "the sync probe")
    with pytest.raises(WeightSyncError, match="rollout's sampled tokens is nan"):
        engine().verify_rollout(float("nan"))
    engine(max_logp_gap=0.01).check_gap(2e-3, "the sync probe")
    engine(dtype="bfloat16").check_gap(0.05, "the sync probe")  # a 16-bit engine's default is 0.1
    with pytest.warns(UserWarning, match="max_logp_gap=0.001"):
        engine(sync_check="warn").verify_rollout(0.5)
    assert engine(sync_check="off").verify_rollout(0.5) == {}
    with pytest.raises(ValueError, match="max_logp_gap must be > 0"):
        VLLM(max_logp_gap=0)


def test_truncated_importance_weights_by_hand():
    policy = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -9.0]])
    engine = torch.tensor([[-1.0, -1.5, -2.5], [-1.0, -0.1, -1.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    weights, stats = truncated_importance_weights(policy, engine, mask, cap=2.0)
    # ratios exp(policy - engine): 1, e^-0.5, e^2 (> 2: capped), e^-2, 1; the padded token counts nowhere
    expected = torch.tensor([[1.0, math.exp(-0.5), 2.0], [math.exp(-2.0), 1.0, 1.0]])
    torch.testing.assert_close(weights, expected)
    assert float(stats["rollout/logp_abs_diff"]) == pytest.approx((0 + 0.5 + 2.0 + 2.0 + 0) / 5)
    assert float(stats["rollout/tis_clipfrac"]) == pytest.approx(1 / 5)
    assert float(stats["rollout/tis_weight_mean"]) == pytest.approx((1 + math.exp(-0.5) + 2 + math.exp(-2) + 1) / 5)
    uncorrected, stats = truncated_importance_weights(policy, engine, mask, cap=None)
    assert torch.equal(uncorrected, torch.ones(2, 3)) and set(stats) == {"rollout/logp_abs_diff"}


def test_off_policy_tokens_are_down_weighted():
    """A token the engine drew more often than the policy would weighs less than an on-policy one; one it drew
    less often weighs more, up to the cap."""
    engine = torch.log(torch.tensor([[0.5, 0.5, 0.5, 0.001]]))
    policy = torch.log(torch.tensor([[0.5, 0.1, 0.6, 0.9]]))
    weights, _ = truncated_importance_weights(policy, engine, torch.ones(1, 4, dtype=torch.bool), cap=3.0)
    on_policy, over_sampled, under_sampled, rare = weights[0].tolist()
    assert on_policy == pytest.approx(1.0)
    assert over_sampled == pytest.approx(0.2)
    assert under_sampled == pytest.approx(1.2)
    assert rare == 3.0


def test_corrected_policy_loss_equals_the_hand_computed_one(tiny_model):
    """The module's micro-batch loss with engine log-probs: in one on-policy pass the PPO ratio is 1, so each token's
    loss is ``-A_i`` times its TIS weight, averaged over the response tokens."""
    module = RLVRModule(
        pretrained=str(tiny_model), rollout=VLLM(importance_cap=2.0),
        sampling=SamplingConfig(num_responses=2, max_new_tokens=6), update=UpdateConfig(micro_batch_size=4),
    )
    module.trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    module.load_processing()
    module.policy = module.model_setup.build_policy(str(tiny_model))
    batch = [{"messages": [{"role": "user", "content": f"What is {a} + 1?"}], "row": a, "source": "t"} for a in (2, 5)]
    torch.manual_seed(0)
    rollout = hf_generate(module).generate([module.render_prompt(s) for s in batch], batch, module.sampling)
    rollout.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    rollout.rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    policy_logp = module.response_forward.logprobs(module.policy, rollout)
    mask = rollout.response_mask
    # the engine's log-prob of every token: the policy's minus 1, 0 or -0.5 in turn (weights e, 1, e^-0.5)
    gap = torch.tensor([1.0, 0.0, -0.5]).repeat(mask.shape[1])[: mask.shape[1]].expand_as(mask)
    rollout.rollout_logp = (policy_logp - gap) * mask
    rows = torch.arange(len(rollout))
    loss, stats = module.micro_batch_loss(MiniBatch.cut(rollout, rows, 4, "token-mean", forward=None), rows, None)
    weights = torch.exp(gap).clamp(max=2.0)
    expected = -(rollout.advantages[:, None] * weights * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    mean_gap = float((gap.abs() * mask).sum() / mask.sum())
    assert float(stats["rollout/logp_abs_diff"]) == pytest.approx(mean_gap, rel=1e-5)
    assert float(stats["rollout/tis_clipfrac"]) == pytest.approx(float(((gap == 1.0) & mask).sum() / mask.sum()))


def test_vllm_settings_are_checked_when_the_recipe_is_read():
    with pytest.raises(ValueError, match="importance_cap"):
        VLLM(importance_cap=0.5)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLM(gpu_memory_utilization=1.5)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_without_vllm_fails_before_loading_a_model(tmp_path, tiny_model, monkeypatch):
    import relax_pl.setups

    monkeypatch.setattr(relax_pl.setups, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    recipe = tiny_recipe(tmp_path, tiny_model, logger=False, model={"rollout": {"class_path": "relax_pl.rollout.VLLM"}})
    with pytest.raises(ImportError, match="bootstrap_vllm.sh"):
        main(["fit", "--config", str(recipe)])


QUESTIONS = ["What is 3 + 5?", "Compute 7 * 2 - 2, step by step.", "Hi"]  # different lengths: different padding


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory):
    """The tiny random Llama with wider weights, so its greedy responses depend on the prompt."""
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", kind="llama")
    module = RLVRModule(
        pretrained=str(folder), rollout=HFContinuousBatching(),
        sampling=SamplingConfig(num_responses=3, max_new_tokens=12, temperature=0.9, top_p=0.9, top_k=50),
    )
    module.configure_model()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.policy.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.15)
    return module


def test_continuous_batching_decodes_hfgenerates_greedy_responses(wide_tiny):
    module = wide_tiny
    batch = [{"messages": [{"role": "user", "content": q}], "row": i, "source": "t"} for i, q in enumerate(QUESTIONS)]
    batched = module.generate(batch, greedy=True)
    plain = hf_generate(module).generate([module.render_prompt(s) for s in batch], batch, module.sampling, greedy=True)
    assert not torch.equal(batched.responses[0], batched.responses[3])
    assert torch.equal(batched.input_ids, plain.input_ids)
    assert torch.equal(batched.response_mask, plain.response_mask)
    assert batched.completions == plain.completions


def test_continuous_batching_samples_from_the_checkpointed_generator(wide_tiny):
    """Its seed is drawn from torch's generator (kept in checkpoints), and that generator is left as one draw moved
    it: a resumed run samples the same responses, and the rest of the step draws what it would have."""
    module = wide_tiny
    batch = [{"messages": [{"role": "user", "content": q}], "row": i, "source": "t"} for i, q in enumerate(QUESTIONS)]
    torch.manual_seed(0)
    first = module.generate(batch)
    after = torch.rand(3)
    torch.manual_seed(0)
    again = module.generate(batch)
    torch.testing.assert_close(torch.rand(3), after)
    assert torch.equal(first.input_ids, again.input_ids)
    torch.manual_seed(0)
    torch.randint(0, 2**31, ())
    torch.testing.assert_close(torch.rand(3), after)  # the engine's only draw was its seed
    assert len({tuple(r) for r in first.responses.tolist()}) > 3  # sampled: a group's responses differ
    torch.manual_seed(1)
    assert not torch.equal(module.generate(batch).input_ids, first.input_ids)


def test_continuous_batching_refuses_images(tmp_path):
    module = RLVRModule(pretrained=str(save_tiny_vl_model(tmp_path / "vl")), rollout=HFContinuousBatching())
    with pytest.raises(ValueError, match="HFContinuousBatching takes no images"):
        module.configure_model()
