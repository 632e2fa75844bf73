"""End-to-end: the CLI fits a tiny random Qwen2 on the built-in arithmetic task, logs, checkpoints, resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from relax_pl.cli import main
from relax_pl.module import RLVRModule

from probes import tensorboard_logs, tiny_recipe


def write_recipe(folder: Path, model: Path, max_steps: int = 2, every_n: int = 1) -> Path:
    """Two PPO epochs of two mini-batches a step (four optimiser steps), a KL term, greedy validation every 2."""
    return tiny_recipe(
        folder, model, callbacks=[{"class_path": "relax_pl.callbacks.SampleLogger", "init_args": {"every_n_steps": 1}}],
        checkpoint_every=every_n,
        trainer={"max_steps": max_steps, "limit_val_batches": 1, "val_check_interval": 2},
        model={
            "objective": {"kl_coef": 0.01, "clip_high": 0.28},
            "update": {"micro_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
        },
        data={
            "val_source": "builtin:arithmetic",
            "system_prompt": "Put the answer in \\boxed{}.",
            "val_batch_size": 2,
        },
    )


def test_two_step_fit_logs_checkpoints_and_validates(tmp_path, tiny_model):
    main(["fit", "--config", str(write_recipe(tmp_path, tiny_model, max_steps=2 * 4))])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    # 2 RL steps x (2 epochs x 2 mini-batches of 4 responses) = 8 optimiser steps
    assert ckpt["global_step"] == 8
    assert "rng_states" in ckpt and ckpt["optimizer_states"]
    logged = tensorboard_logs(tmp_path)[0]
    for tag in [
        "critic/score/mean", "reward/accuracy", "reward/format", "actor/pg_loss", "actor/kl_loss",
        "actor/entropy", "actor/pg_clipfrac", "actor/ppo_kl", "actor/grad_norm", "response_length/mean",
        "timing_s/gen", "timing_s/reward", "timing_s/old", "timing_s/ref", "timing_s/update",
        "perf/throughput", "val/reward", "val/accuracy",
    ]:
        assert tag in logged, f"{tag} not logged; got {sorted(logged)}"
    assert all(v > 0 for v in logged["actor/entropy"])
    texts = list(tmp_path.rglob("events.out.tfevents.*"))
    assert any(b"samples" in p.read_bytes() for p in texts)


def test_resume_is_exact(tmp_path, tiny_model):
    """Two steps then a resume to four gives the same weights as four steps in one go (optimizer, data
    position and sampling RNG all restored)."""
    straight = tmp_path / "straight"
    main(["fit", "--config", str(write_recipe(straight, tiny_model, max_steps=4 * 4)), "--trainer.limit_val_batches", "0"])
    split = tmp_path / "split"
    recipe = write_recipe(split, tiny_model, max_steps=2 * 4)
    main(["fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"])
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "16", "--trainer.limit_val_batches", "0", "--ckpt_path", "last"])
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 16
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], rtol=0, atol=0, msg=name)


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


def test_print_config_of_every_shipped_recipe(capsys):
    for recipe in sorted(Path("recipes").glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(recipe), "--print_config"])
        assert exit_info.value.code in (0, None), recipe
        assert "pretrained" in capsys.readouterr().out


def test_sigkill_then_resume_finishes(tmp_path, tiny_model):
    recipe = write_recipe(tmp_path, tiny_model, max_steps=6 * 4, every_n=4)
    command = [sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    second = tmp_path / "checkpoints" / "epoch=0-step=8.ckpt"
    while not second.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    interrupted = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert 8 <= interrupted["global_step"] < 24
    resumed = subprocess.run(command + ["--ckpt_path", "last"], env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-3000:]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 24


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
        checkpoint = torch.load(target, weights_only=False)
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


def test_dynamic_sampling_drops_uniform_groups_and_skips_an_empty_update(tmp_path, tiny_model):
    """A random model never earns a reward: every group is uniform, so every group is dropped and logged,
    and no optimiser step is taken."""
    recipe = write_recipe(tmp_path, tiny_model, max_steps=8)
    args = ["--model.update.dynamic_sampling", "true", "--trainer.limit_val_batches", "0", "--trainer.max_epochs", "1"]
    main(["fit", "--config", str(recipe), *args])
    logged = tensorboard_logs(tmp_path)[0]
    assert logged["data/dropped_groups"] and all(v == 2.0 for v in logged["data/dropped_groups"])
    assert "actor/pg_loss" not in logged
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 0
