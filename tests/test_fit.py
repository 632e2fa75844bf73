"""End-to-end: the CLI fits a tiny random Qwen2 on the built-in arithmetic task, logs, checkpoints, resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.cli import main
from relax_pl.errors import RecipeError
from relax_pl.module import RLVRModule

from probes import OptimizerStepSpy, assert_same_weights, moved_weights, policy_weights, tensorboard_logs, tiny_recipe


def write_recipe(folder: Path, model: Path, max_steps: int = 2, every_n: int = 1, num_samples: int = 12) -> Path:
    """Two PPO epochs of two mini-batches a step (four optimiser steps), a KL term, greedy validation every 2;
    rewards that vary within groups (length parity as accuracy), so every step trains."""
    return tiny_recipe(
        folder, model, callbacks=[{"class_path": "relax_pl.callbacks.SampleLogger", "init_args": {"every_n_steps": 1}}],
        checkpoint_every=every_n,
        trainer={"max_steps": max_steps, "limit_val_batches": 1, "val_check_interval": 2},
        model={
            "reward": {"class_path": "probes.ParityAccuracyReward"},
            "objective": {
                "kl_coef": 0.01,
                "policy_loss": {"class_path": "relax_pl.losses.PPOClip", "init_args": {"clip_high": 0.28}},
            },
            "update": {"micro_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
        },
        data={
            "val_source": "builtin:arithmetic",
            "system_prompt": "Put the answer in \\boxed{}.",
            "val_batch_size": 2,
            "task_options": {"digits": 1, "operations": "+", "num_samples": num_samples},
        },
    )


def test_two_step_fit_logs_checkpoints_and_validates(tmp_path, tiny_model):
    main(["fit", "--config", str(write_recipe(tmp_path, tiny_model, max_steps=2 * 4))])
    ckpt = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    # 2 RL steps x (2 epochs x 2 mini-batches of 4 responses) = 8 optimiser steps
    assert ckpt["global_step"] == 8
    assert "rng_states" in ckpt and ckpt["optimizer_states"]
    assert moved_weights(policy_weights(tmp_path / "checkpoints" / "last.ckpt"), tiny_model)
    logged = tensorboard_logs(tmp_path)[0]
    for tag in [
        "critic/score/mean", "reward/accuracy", "reward/format", "actor/pg_loss", "actor/kl_loss",
        "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "response_length/mean",
        "timing_s/gen", "timing_s/reward", "timing_s/old", "timing_s/ref", "timing_s/update",
        "perf/throughput", "val/reward", "val/accuracy",
    ]:
        assert tag in logged, f"{tag} not logged; got {sorted(logged)}"
    assert all(v > 0 for v in logged["actor/entropy"])
    assert all(v > 0 for v in logged["actor/grad_norm"]) and any(v != 0 for v in logged["actor/pg_loss"])
    texts = list(tmp_path.rglob("events.out.tfevents.*"))
    assert any(b"samples" in p.read_bytes() for p in texts)


@pytest.mark.parametrize("num_samples", [12, 4], ids=["mid_epoch", "at_an_epoch_end"])
def test_resume_is_exact(tmp_path, tiny_model, num_samples):
    """Two steps then a resume to four gives the same weights as four steps in one go. The steps train (rewards
    vary within groups), so a resume that restored only the step count, or not the optimizer, the data position
    or the sampling RNG, would end on other weights. With 4 prompts (2 steps an epoch) the resume starts a new
    epoch, whose data iterator the uninterrupted run made between steps 2 and 3."""
    straight = tmp_path / "straight"
    recipe = write_recipe(straight, tiny_model, max_steps=4 * 4, num_samples=num_samples)
    main(["fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"])
    split = tmp_path / "split"
    recipe = write_recipe(split, tiny_model, max_steps=2 * 4, num_samples=num_samples)
    main(["fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"])
    halfway = policy_weights(split / "checkpoints" / "last.ckpt")
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "16", "--trainer.limit_val_batches", "0", "--ckpt_path", "last"])
    a = load_checkpoint_file(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 16
    final = policy_weights(split / "checkpoints" / "last.ckpt")
    assert_same_weights(policy_weights(straight / "checkpoints" / "last.ckpt"), final)
    assert_same_weights(halfway, policy_weights(straight / "checkpoints" / "epoch=0-step=8.ckpt"))
    assert any(not torch.equal(final[name], halfway[name]) for name in final)  # the resumed steps trained


def test_bad_key_fails_before_loading_a_model(tmp_path, tiny_model, capsys, monkeypatch):
    import relax_pl.setups

    monkeypatch.setattr(relax_pl.setups, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    recipe = yaml.safe_load(write_recipe(tmp_path, tiny_model).read_text())
    recipe["model"]["sampling"]["temprature"] = 0.5
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "temprature" in capsys.readouterr().err

    recipe["model"]["sampling"].pop("temprature")
    recipe["model"]["update"]["micro_batch_size"] = "eight"
    bad.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert "micro_batch_size" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, line",
    [
        ("model.optimizer.lr", "-0.001", "model.optimizer.lr=-0.001: the learning rate must be a positive number"),
        ("model.sampling.max_new_tokens", "0", "model.sampling.max_new_tokens=0: a response needs >= 1 token"),
        ("model.validation.max_new_tokens", "0", "model.validation.max_new_tokens=0: a response needs >= 1 token"),
        ("model.update.micro_batch_size", "0", "model.update.micro_batch_size=0: must be >= 1"),
        ("data.train_source", "./missing.jsonl", "data.train_source='./missing.jsonl': no such file or folder"),
    ],
)
def test_bad_values_fail_naming_the_key_when_the_recipe_is_read(tmp_path, tiny_model, monkeypatch, option, value, line):
    """Before: a negative lr failed after the weights loaded with a torch traceback, max_new_tokens 0 did not say
    which key, a validation max_new_tokens of 0 was silently the training one, a missing file did not name its key."""
    import relax_pl.setups

    monkeypatch.setattr(relax_pl.setups, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(RecipeError) as raised:
        main(["fit", "--config", str(write_recipe(tmp_path, tiny_model)), f"--{option}", value])
    assert str(raised.value).startswith(line)


def test_a_user_error_is_one_line_and_a_mistyped_key_gets_a_did_you_mean(tmp_path, tiny_model):
    """``python -m relax_pl``: a bad value is one line (exit 1), its traceback only with RELAX_PL_DEBUG=1; a mistyped
    key is one line naming the key it may be (exit 2), not the 110-line usage first."""
    recipe = write_recipe(tmp_path, tiny_model)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe), *args]
        return subprocess.run(command, env={**env, **extra_env}, capture_output=True, text=True, timeout=300)

    bad = run("--model.optimizer.lr", "-0.001")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines()[-1] == (
        "python -m relax_pl: error: model.optimizer.lr=-0.001: the learning rate must be a positive number, e.g. 1e-6"
        "  (RELAX_PL_DEBUG=1 shows the traceback)"
    )
    debug = run("--model.optimizer.lr", "-0.001", RELAX_PL_DEBUG="1")
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("relax_pl.errors.RecipeError: model.optimizer.lr=-0.001")
    typo = run("--model.optimizer.lrr", "0.1")
    assert typo.returncode == 2 and "usage:" not in typo.stderr, typo.stderr[-2000:]
    assert typo.stderr.strip().splitlines()[-1] == (
        "python -m relax_pl fit: error: unrecognized arguments: --model.optimizer.lrr 0.1 (model.optimizer.lrr: did "
        "you mean model.optimizer.lr?)  (RELAX_PL_DEBUG=1 shows the full usage)"
    )


def test_every_optimiser_step_is_applied_and_moves_the_weights(tmp_path, tiny_model):
    """ppo_epochs x mini-batches real optimiser steps per training batch (2 x 2 here), each changing the weights,
    counted at the torch optimiser itself: a lost step (every second one dropped, one taken on zeroed gradients)
    shows here and not only through its side effects."""
    recipe = write_recipe(tmp_path, tiny_model, max_steps=2 * 4)
    config = yaml.safe_load(recipe.read_text())
    config["trainer"]["callbacks"].append({"class_path": "probes.OptimizerStepSpy"})
    config["trainer"]["limit_val_batches"] = 0
    recipe.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(recipe)])
    spy = next(callback for callback in cli.trainer.callbacks if isinstance(callback, OptimizerStepSpy))
    assert spy.steps == [[True] * 4, [True] * 4]
    assert cli.trainer.global_step == 8


def print_config(capsys, *args: str) -> str:
    """What ``fit --print_config`` prints for ``args``, checking that it exits cleanly and warns nothing."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    printed = capsys.readouterr()
    assert exit_info.value.code in (0, None), printed.err
    assert "Unable to serialize" not in printed.out + printed.err
    return printed.out


def test_print_config_of_every_shipped_recipe_is_a_recipe(tmp_path, capsys, recwarn):
    """A resolved recipe re-runs the same run: each shipped recipe's --print_config, fed back as --config, parses
    (no weights are read, so the GPU and hub recipes parse here too) and resolves to the same config."""
    recipes = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 10, recipes  # run from any folder, it tests the shipped recipes
    for recipe in recipes:
        resolved = print_config(capsys, "--config", str(recipe))
        assert "pretrained" in resolved
        copy = tmp_path / recipe.name
        copy.write_text(resolved)
        assert print_config(capsys, "--config", str(copy)) == resolved, recipe
    assert not [w for w in recwarn if "serialize" in str(w.message)]


WRITER = """
import sys, torch
from relax_pl.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
i = 0
while True:
    io.save_checkpoint({"step": i, "blob": torch.full((4_000_000,), float(i))}, sys.argv[1])
    i += 1
    print(i, flush=True)
"""


def test_killed_checkpoint_write_never_corrupts_last(tmp_path):
    target = tmp_path / "last.ckpt"
    for delay in (0.05, 0.13, 0.31):
        process = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE)
        process.stdout.readline()  # at least one complete checkpoint exists
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        checkpoint = load_checkpoint_file(target)
        assert torch.equal(checkpoint["blob"], torch.full((4_000_000,), float(checkpoint["step"])))


class ShortestWinsModule(RLVRModule):
    """A batch-level reward: 1 for the responses shorter than their group's median length."""

    def compute_rewards(self, rollout):
        lengths = rollout.response_mask.sum(-1).float().view(-1, rollout.group_size)
        overall = (lengths < lengths.median(dim=1, keepdim=True).values).float().view(-1)
        self.seen_rewards.append(overall)
        return {"overall": overall}


def test_subclass_overrides_the_reward_method(tmp_path, tiny_model):
    ShortestWinsModule.seen_rewards = []
    recipe = write_recipe(tmp_path, tiny_model, max_steps=8)
    main(["fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"], model_class=ShortestWinsModule)
    assert len(ShortestWinsModule.seen_rewards) == 2
    logged = tensorboard_logs(tmp_path)[0]["critic/score/mean"]
    expected = [float(r.mean()) for r in ShortestWinsModule.seen_rewards]
    assert logged == pytest.approx(expected, abs=1e-6)
    assert "reward/accuracy" not in tensorboard_logs(tmp_path)[0]
    assert moved_weights(policy_weights(tmp_path / "checkpoints" / "last.ckpt"), tiny_model)  # its rewards trained


def test_dynamic_sampling_drops_uniform_groups_and_skips_an_empty_update(tmp_path, tiny_model):
    """A random model never earns MathReward's reward: every group is uniform, so every group is dropped and
    logged, and no optimiser step is taken."""
    recipe = write_recipe(tmp_path, tiny_model, max_steps=8)
    args = ["--model.update.dynamic_sampling", "true", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
            "--model.reward", "relax_pl.rewards.MathReward"]
    main(["fit", "--config", str(recipe), *args])
    logged = tensorboard_logs(tmp_path)[0]
    assert logged["data/dropped_groups"] and all(v == 2.0 for v in logged["data/dropped_groups"])
    assert "actor/pg_loss" not in logged
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 0


class RecordingModule(RLVRModule):
    """Keeps every scored rollout's rewards (before dynamic sampling) and, in validation, its components."""

    def compute_rewards(self, rollout):
        components = super().compute_rewards(rollout)
        stage = "val" if self.trainer.validating else "train"
        self.recorded[stage].append({name: values.clone() for name, values in components.items()})
        self.group_sizes[stage].append(rollout.group_size)
        return components


def recording_module():
    RecordingModule.recorded = {"train": [], "val": []}
    RecordingModule.group_sizes = {"train": [], "val": []}
    return RecordingModule


def test_dynamic_sampling_keeps_the_groups_that_vary(tmp_path, tiny_model):
    """Even rows get length parity (their groups usually vary), odd rows 0 (uniform): each step keeps exactly
    the groups whose rewards differ, drops and counts the others, and trains on what it kept."""
    recipe = write_recipe(tmp_path, tiny_model, max_steps=8)
    args = ["--model.update.dynamic_sampling", "true", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1",
            "--model.reward", "probes.EvenRowsParityReward", "--model.update.mini_batch_size", "null",
            "--model.update.ppo_epochs", "1"]
    kept_probe = {"class_path": "probes.ShardProbe", "init_args": {"out": str(tmp_path / "probe")}}
    cli = main(["fit", "--config", str(recipe), *args, "--trainer.callbacks+", json.dumps(kept_probe)],
               model_class=recording_module())
    kept = [step["rewards"] for step in json.loads((tmp_path / "probe" / "rank0.json").read_text())["steps"]]
    logged = tensorboard_logs(tmp_path)[0]
    mixed_seen = uniform_seen = 0
    for rewards, kept_rewards, dropped in zip(RecordingModule.recorded["train"], kept, logged["data/dropped_groups"]):
        groups = rewards["overall"].view(-1, 4)
        varies = groups.max(-1).values > groups.min(-1).values
        mixed_seen, uniform_seen = mixed_seen + int(varies.sum()), uniform_seen + int((~varies).sum())
        assert kept_rewards == groups[varies].reshape(-1).tolist()  # the groups that vary, in order
        assert dropped == float((~varies).sum())
    assert mixed_seen and uniform_seen  # both kinds occurred
    assert cli.trainer.global_step > 0
    assert moved_weights(policy_weights(tmp_path / "checkpoints" / "last.ckpt"), tiny_model)


def test_validation_accuracies_are_the_means_of_what_was_scored(tmp_path, tiny_model):
    """mean@k, pass@k and greedy accuracy on a case where they differ (length parity as accuracy: about half the
    sampled responses right): the logged values are recomputed from the scored rollouts."""
    recipe = write_recipe(tmp_path, tiny_model)
    args = ["--model.validation.num_responses", "4", "--model.validation.temperature", "1.0",
            "--trainer.limit_val_batches", "2", "--data.val_batch_size", "3", "--trainer.logger", "false"]
    cli = main(["validate", "--config", str(recipe), *args], model_class=recording_module())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    scored = list(zip(RecordingModule.recorded["val"], RecordingModule.group_sizes["val"]))
    sampled = [(components["accuracy"], k) for components, k in scored if k == 4]
    greedy = [components["accuracy"] for components, k in scored if k == 1]
    per_prompt = torch.cat([accuracy.view(-1, k) for accuracy, k in sampled])
    assert per_prompt.shape == (6, 4) and torch.cat(greedy).shape == (6,)
    mean_at_k, pass_at_k = float(per_prompt.mean()), float(per_prompt.max(-1).values.mean())
    assert 0 < mean_at_k < pass_at_k  # not the trivial all-zero case
    assert metrics["val/accuracy/mean@4"] == pytest.approx(mean_at_k)
    assert metrics["val/accuracy"] == pytest.approx(mean_at_k)
    assert metrics["val/accuracy/pass@4"] == pytest.approx(pass_at_k)
    assert metrics["val/accuracy/greedy"] == pytest.approx(float(torch.cat(greedy).mean()))
    sampled_overall = torch.cat([components["overall"] for components, k in scored if k == 4])
    assert metrics["val/reward"] == pytest.approx(float(sampled_overall.mean()))


def test_val_accuracy_with_several_rewards_and_with_none_that_reports_one(tmp_path, tiny_model):
    """Several rewards: val/accuracy is the first reward's that reports one (it used to vanish). No reward reporting
    an accuracy: no val/accuracy at all, and a warning says so (it used to be the overall reward, silently)."""
    recipe = write_recipe(tmp_path, tiny_model)
    args = ["--model.validation.num_responses", "4", "--model.validation.temperature", "1.0",
            "--trainer.limit_val_batches", "1", "--data.val_batch_size", "3", "--trainer.logger", "false"]
    several = json.dumps([{"class_path": "probes.LengthParityReward"}, {"class_path": "probes.ParityAccuracyReward"}])
    cli = main(["validate", "--config", str(recipe), *args, "--model.reward", several], model_class=recording_module())
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    sampled = [c["ParityAccuracyReward/accuracy"] for c, k in zip(RecordingModule.recorded["val"],
                                                                   RecordingModule.group_sizes["val"]) if k == 4]
    accuracy = float(torch.cat(sampled).mean())
    assert 0 < accuracy < 1
    assert metrics["val/accuracy"] == pytest.approx(accuracy)
    assert metrics["val/accuracy/mean@4"] == pytest.approx(accuracy)
    assert metrics["val/ParityAccuracyReward/accuracy"] == pytest.approx(accuracy)

    with pytest.warns(UserWarning, match="no reward of model.reward reports an 'accuracy'"):
        cli = main(["validate", "--config", str(recipe), *args, "--model.reward", "probes.LengthParityReward"])
    metrics = cli.trainer.callback_metrics
    assert "val/reward" in metrics and not [name for name in metrics if "accuracy" in name], sorted(metrics)


def test_rlvr_module_imports_no_callback():
    """The README's promise: RLVRModule (and what it imports) loads no callback module."""
    code = (
        "import sys, relax_pl.module, relax_pl.cli\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('relax_pl.callbacks') or m == 'callbacks')\n"
        "print(loaded)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_a_group_of_one_is_refused_for_training(tmp_path, tiny_model, monkeypatch):
    """num_responses 1 would train on zero advantages without a word: refused before any weights load."""
    import relax_pl.setups

    monkeypatch.setattr(relax_pl.setups, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    recipe = write_recipe(tmp_path, tiny_model)
    with pytest.raises(ValueError, match=r"model.sampling.num_responses=1: GRPO's advantage is relative to the"):
        main(["fit", "--config", str(recipe), "--model.sampling.num_responses", "1"])
