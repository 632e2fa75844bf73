"""A new loss, reward combination, model family or regulariser is one new file: the README's examples, run as
written (each code block is copied out of README.md into a module of its own), and the contract each relies on."""

from __future__ import annotations

import importlib
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from relax_pl.cli import main
from relax_pl.families import FAMILIES, family_of, final_norm
from relax_pl.forward import ResponseForward
from relax_pl.losses import LossInput
from relax_pl.objectives import group_advantages
from relax_pl.rewards import MathReward, RewardScorer, named_rewards
from relax_pl.rollout import RolloutBatch
from relax_pl.setups import SingleDevice

from probe_rewards import FlakyReward, LengthParityReward, ParityAccuracyReward
from probes import moved_weights, policy_weights, tensorboard_logs, tiny_recipe

README = Path(__file__).parents[1] / "README.md"


def readme_module(section: str, name: str, folder: Path, monkeypatch) -> object:
    """The first Python block under the README heading ``section``, imported as module ``name`` from ``folder``."""
    text = README.read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    (folder / f"{name}.py").write_text(code)
    monkeypatch.syspath_prepend(str(folder))
    return importlib.import_module(name)


def test_the_readme_loss_is_one_file_with_hand_checked_values(tmp_path, monkeypatch):
    losses = readme_module("Write a loss", "my_losses", tmp_path, monkeypatch)
    # ratios 1.5, 0.2, 5 against old log-probs 0; A = -1: PPO gives 1.5, 0.8, 5; the dual clip caps 5 at 3
    logp = torch.log(torch.tensor([[1.5, 0.2, 5.0]]))
    batch = LossInput(logp, torch.zeros(1, 3), torch.tensor([-1.0]), torch.ones(1, 3, dtype=torch.bool))
    out = losses.DualClip(clip=0.2, dual_clip=3.0)(batch)
    assert out.per_token[0].tolist() == pytest.approx([1.5, 0.8, 3.0], rel=1e-6)
    assert float(out.metrics["actor/dual_clipfrac"]) == pytest.approx(1 / 3)


def test_a_loss_a_regulariser_and_several_rewards_from_their_own_files(tmp_path, tiny_model, monkeypatch):
    """One fit with the README's loss (``my_losses.DualClip``), its regulariser (``my_regularisers
    .EntropyOnFailures``) and two weighted rewards, each named by its class_path in the recipe alone."""
    readme_module("Write a loss", "my_losses", tmp_path, monkeypatch)
    readme_module("Adding a regulariser: the extension point", "my_regularisers", tmp_path, monkeypatch)
    recipe = tiny_recipe(
        tmp_path / "run", tiny_model,
        [{"class_path": "my_regularisers.EntropyOnFailures", "init_args": {"coef": 0.05}}],
        model={
            "reward": [
                {"class_path": "probe_rewards.LengthParityReward"}, {"class_path": "probe_rewards.ParityAccuracyReward"}
            ],
            "reward_weights": [1.0, 0.5],
            "objective": {"policy_loss": {"class_path": "my_losses.DualClip", "init_args": {"dual_clip": 3.0}}},
            "update": {"micro_batch_size": 4, "ppo_epochs": 2},
        },
    )
    main(["fit", "--config", str(recipe)])
    scalars, _ = tensorboard_logs(tmp_path / "run")
    for tag in (
        "actor/dual_clipfrac", "entropy_on_failures", "reward/LengthParityReward", "reward/ParityAccuracyReward",
        "reward/ParityAccuracyReward/accuracy", "reward/ParityAccuracyReward/format",
    ):
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert all(v <= 0 for v in scalars["entropy_on_failures"]) and min(scalars["entropy_on_failures"]) < 0
    for overall, parity, accuracy_reward in zip(
        scalars["critic/score/mean"], scalars["reward/LengthParityReward"], scalars["reward/ParityAccuracyReward"]
    ):
        assert overall == pytest.approx(parity + 0.5 * accuracy_reward, abs=1e-6)
    assert moved_weights(policy_weights(tmp_path / "run" / "checkpoints" / "last.ckpt"), tiny_model)


def test_dr_grpo_trains_with_centred_advantages_from_the_recipe_key_alone(tmp_path, tiny_model):
    """``policy_loss: relax_pl.losses.DrGRPO`` and nothing else: the advantages are only centred (r - group mean, not
    divided by the std) and the update reduces with the token budget (it would raise without one)."""
    recipe = tiny_recipe(
        tmp_path, tiny_model, [{"class_path": "probes.ShardProbe", "init_args": {"out": str(tmp_path / "probe")}}],
        model={"reward": {"class_path": "probe_rewards.ParityAccuracyReward"},
               "objective": {"policy_loss": {"class_path": "relax_pl.losses.DrGRPO"}}},
    )
    main(["fit", "--config", str(recipe)])
    steps = json.loads((tmp_path / "probe" / "rank0.json").read_text())["steps"]
    scaled_differs = False
    for step in steps:
        rewards = torch.tensor(step["rewards"]).view(-1, step["group_size"])
        centred = (rewards - rewards.mean(-1, keepdim=True)).reshape(-1)
        assert torch.tensor(step["advantages"]).tolist() == pytest.approx(centred.tolist(), abs=1e-6)
        scaled_differs |= not torch.allclose(centred, group_advantages(rewards.reshape(-1), step["group_size"]))
    assert scaled_differs  # GRPO's std scaling would have given other advantages
    scalars, _ = tensorboard_logs(tmp_path)
    assert any(v != 0 for v in scalars["actor/pg_loss"])
    assert moved_weights(policy_weights(tmp_path / "checkpoints" / "last.ckpt"), tiny_model)


def test_what_a_callback_sees_and_how_its_terms_and_an_engines_metrics_are_logged(tmp_path, tiny_model):
    """The README's contract for callback and engine authors: forward.rows index the rollout and forward.group_index
    is the rows' prompt; with several rewards the components are "<Name>/<part>"; a loss term is its micro-batch's
    share (the shares add up to the mini-batch term, which is what is logged) while a metric is averaged over the
    micro-batches; an engine logs through module.log during the training step."""
    probe = {"class_path": "probes.ContractProbe"}
    recipe = tiny_recipe(
        tmp_path, tiny_model, [probe],
        model={
            "reward": [
                {"class_path": "relax_pl.rewards.MathReward"}, {"class_path": "probe_rewards.LengthParityReward"}
            ],
            "rollout": {"class_path": "probes.LoggingEngine"},
            "update": {"micro_batch_size": 2, "mini_batch_size": 4},
        },
    )
    cli = main(["fit", "--config", str(recipe)])
    callback = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ContractProbe")
    assert callback.components[0] == [
        "LengthParityReward", "MathReward", "MathReward/accuracy", "MathReward/format", "overall"
    ]
    assert all(seen["groups"] == seen["expected_groups"] and len(seen["rows"]) == 2 for seen in callback.seen)
    assert len(callback.seen) == 4 and len({row for seen in callback.seen for row in seen["rows"]}) == 8  # 2 x 2
    scalars, _ = tensorboard_logs(tmp_path)
    assert scalars["probe/share"] == pytest.approx([1.0])  # shares of 2/4 summed per mini-batch: the term is 1
    assert scalars["probe/micro_rows"] == pytest.approx([2.0])  # averaged over the 4 micro-batches, not summed
    assert scalars["rollout/prompts"] == pytest.approx([2.0])


def test_several_rewards_each_bounded_and_named():
    with pytest.raises(ValueError, match="2 weights for 3 rewards"):
        named_rewards([MathReward(), MathReward(), LengthParityReward()], [1.0, 2.0])
    with pytest.raises(ValueError, match="single reward"):
        named_rewards(MathReward(), [1.0])
    assert [n for n, _, _ in named_rewards([MathReward(), MathReward(), LengthParityReward()], None)] == [
        "MathReward", "MathReward_2", "LengthParityReward"]
    completions = ["ab", "abc", "1234", "x"]
    samples = [{"prompt": "p", "answer": "a"}] * len(completions)
    rewards = [LengthParityReward(), ParityAccuracyReward(), FlakyReward(timeout_s=0.5)]
    with RewardScorerContext(rewards, [1.0, 0.5, 2.0]) as scorer:
        scored = scorer(completions, samples)
    with RewardScorerContext(FlakyReward(timeout_s=0.5), None) as alone:
        flaky = alone(completions, samples)
    parity = [float(len(c) % 2 == 0) for c in completions]
    accuracy_reward = [0.9 * p + 0.1 * any(ch.isdigit() for ch in c) for p, c in zip(parity, completions)]
    assert scored.components["LengthParityReward"] == parity
    assert scored.components["ParityAccuracyReward/accuracy"] == parity
    assert scored.components["FlakyReward"] == flaky.components["overall"]  # its failures cost its own part only
    expected = [p + 0.5 * a + 2.0 * f for p, a, f in zip(parity, accuracy_reward, flaky.components["overall"])]
    assert scored.components["overall"] == pytest.approx(expected)
    assert (scored.timeouts, scored.errors) == (flaky.timeouts, flaky.errors)


class RewardScorerContext:
    def __init__(self, reward, weights) -> None:
        self.scorer = RewardScorer(reward, weights, processes_per_node=1)

    def __enter__(self) -> RewardScorer:
        return self.scorer

    def __exit__(self, *exc_info) -> None:
        self.scorer.close()


def test_the_readme_model_family_is_one_file(tmp_path, monkeypatch):
    """GPT-2 keeps its final norm at transformer.ln_f: without an adapter relax_pl names the known families; with the
    README's one file, a response forward reads GPT-2's hidden states and log-probs (equal to a plain forward's)."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=1))
    model.eval()
    with pytest.raises(ValueError, match="model_type 'gpt2'.*known families are llama, qwen2, qwen2_5_vl, qwen2_vl"):
        final_norm(model)
    try:
        readme_module("Write a model family", "my_families", tmp_path, monkeypatch)
        read_gpt2(model)
    finally:
        FAMILIES.pop("gpt2", None)  # the other tests see relax_pl's own families only


def test_a_family_adapter_is_imported_by_the_recipe_and_checked_when_the_model_loads(tmp_path, monkeypatch):
    """A GPT-2 checkpoint without an adapter fails when the policy loads, naming gpt2 and the known families, before
    any rollout; with the README's adapter in a module the recipe lists under ``imports``, the same recipe trains."""
    from relax_pl.rollout import HFGenerate
    from relax_pl.testing import build_test_tokenizer

    tokenizer = build_test_tokenizer()
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=256,
                        bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id)
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(tmp_path / "run", folder, model={"reward": {"class_path": "probe_rewards.LengthParityReward"}})

    real_generate = HFGenerate.generate
    monkeypatch.setattr(HFGenerate, "generate", lambda *a, **k: pytest.fail("a rollout ran before the family check"))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*known families are llama, qwen2, qwen2_5_vl, qwen2_vl"):
        main(["fit", "--config", str(recipe)])
    monkeypatch.setattr(HFGenerate, "generate", real_generate)

    sys.modules.pop("my_families", None)
    readme_module("Write a model family", "my_families", tmp_path, monkeypatch)  # the file, on the path
    sys.modules.pop("my_families")  # imported again by the run, from the recipe's imports alone
    FAMILIES.pop("gpt2")
    try:
        main(["fit", "--config", str(recipe), "--imports", "my_families"])
        assert FAMILIES["gpt2"].__name__ == "GPT2"
    finally:
        FAMILIES.pop("gpt2", None)
        sys.modules.pop("my_families", None)
    assert moved_weights(policy_weights(tmp_path / "run" / "checkpoints" / "last.ckpt"), folder)


def read_gpt2(model: GPT2LMHeadModel) -> None:
    assert type(family_of(model)).__name__ == "GPT2" and final_norm(model) is model.transformer.ln_f
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 64, (2, 5), generator=generator)
    responses = torch.randint(2, 64, (4, 3), generator=generator)
    rollout = RolloutBatch(
        input_ids=torch.cat([prompts.repeat_interleave(2, 0), responses], 1),
        attention_mask=torch.ones(4, 8, dtype=torch.long),
        response_mask=torch.ones(4, 3, dtype=torch.bool),
        prompt_length=5, completions=[""] * 4, samples=[{}] * 4, group_size=2,
        prompt_index=torch.tensor([0, 0, 1, 1]),
    )
    out = ResponseForward(SingleDevice(), temperature=1.0, chunk_size=4, micro_batch_size=4)(
        model, rollout, torch.arange(4), keep_hidden=True
    )
    with torch.no_grad():
        full = model(rollout.input_ids, output_hidden_states=True)
    expected = full.logits[:, 4:7].log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1)
    torch.testing.assert_close(out.logp, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.hidden, full.hidden_states[-1][:, 5:], rtol=1e-4, atol=1e-5)
    assert math.isfinite(float(out.entropy.sum()))


def test_every_package_of_the_framework_is_installed_by_a_wheel():
    """pyproject lists its packages by hand (``callbacks/`` installs as ``relax_pl.callbacks``); a folder left off
    the list imports from a checkout but is missing from ``pip install .``."""
    import tomllib

    root = README.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(root).parts) for p in (root / "relax_pl").rglob("__init__.py")}
    on_disk |= {"relax_pl." + ".".join(p.parent.relative_to(root).parts)
                for p in (root / "callbacks").rglob("__init__.py")}
    assert on_disk - listed == set(), f"add these to [tool.setuptools] packages in pyproject.toml: {on_disk - listed}"
