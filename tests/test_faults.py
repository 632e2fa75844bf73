"""The fault matrix: each test is one row of the README's "Reliability" table and says what the fault cost.

A tiny random Qwen2 trains for real (length-parity rewards vary within groups, so advantages and gradients are
not zero) on the CPU: 4 training batches of 2 prompts x 4 responses, each batch two PPO epochs of two mini-batches
(4 optimiser steps), a checkpoint after every second batch (so a killed run has logged, and loses, a batch the
checkpoint does not hold), sampled validation (2 responses per prompt, 2 batches) after batches 1 and 3. A killed
run is a real ``python -m relax_pl fit`` process that SIGKILLs itself inside the phase
(tests/probes.py ``KillAt``); the resumed run is ``fit --ckpt_path last``; both must end on the weights, and
TensorBoard curves, of the run that was never interrupted.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import relax_pl.cli
from relax_pl.checkpointing import AtomicCheckpointIO, CheckpointError, CheckpointWriteError, load_checkpoint_file
from relax_pl.cli import main, wait_past_event_files
from relax_pl.errors import RewardFailedError
from relax_pl.export import export

from probes import (
    NonFiniteLossAt,
    assert_same_weights,
    moved_weights,
    policy_weights,
    tensorboard_logs,
    tensorboard_run,
    tiny_recipe,
)

TESTS = Path(__file__).parent
BATCHES = 4
OPTIMIZER_STEPS_PER_BATCH = 4
CHECKPOINT_EVERY = 2 * OPTIMIZER_STEPS_PER_BATCH


def fault_recipe(folder: Path, model: Path, callbacks: list[dict] = (), **model_keys) -> Path:
    return tiny_recipe(
        folder, model, callbacks=list(callbacks), seed=11, checkpoint_every=CHECKPOINT_EVERY,
        trainer={"max_steps": BATCHES * OPTIMIZER_STEPS_PER_BATCH, "limit_val_batches": 2, "val_check_interval": 2},
        model={
            "reward": {"class_path": "probes.LengthParityReward"},
            "objective": {
                "kl_coef": 0.01,
                "policy_loss": {"class_path": "relax_pl.losses.PPOClip", "init_args": {"clip_high": 0.28}},
            },
            "update": {"micro_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 2},
            "validation": {"num_responses": 2, "temperature": 1.0, "greedy": False},
            **model_keys,
        },
        data={"val_source": "builtin:arithmetic", "val_batch_size": 2},
    )


def last_checkpoint(folder: Path) -> Path:
    return folder / "checkpoints" / "last.ckpt"


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / "checkpoints").glob(".*.tmp"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    main(["fit", "--config", str(fault_recipe(folder, tiny_model))])
    assert moved_weights(policy_weights(last_checkpoint(folder)), tiny_model)  # it trains
    return folder


def subprocess_env() -> dict[str, str]:
    """For a ``python -m relax_pl`` process: tests/ importable (recipes name probes), and this process's thread
    count, with which CPU kernels give bitwise the same results there as here."""
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()),
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def run_killed(folder: Path, model: Path, phase: str, step: int) -> dict:
    """A ``python -m relax_pl fit`` process that kills itself in ``phase`` of batch ``step``; what it was doing."""
    fault_recipe(folder, model)  # the recipe the resumed run uses
    marker = folder / "killed.json"
    killing = {"class_path": "probes.KillAt", "init_args": {"phase": phase, "step": step, "marker": str(marker)}}
    recipe = fault_recipe(folder / "killed_run", model, [killing])
    config = yaml.safe_load(recipe.read_text())
    config["trainer"]["default_root_dir"] = str(folder)
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(folder)
    config["trainer"]["callbacks"][0]["init_args"]["dirpath"] = str(folder / "checkpoints")
    recipe.write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe)], env=subprocess_env(),
                          capture_output=True, timeout=600)
    assert done.returncode == -9, f"the run was not killed (exit {done.returncode}):\n{done.stderr.decode()[-3000:]}"
    return json.loads(marker.read_text())


def resume(folder: Path) -> None:
    main(["fit", "--config", str(folder / "recipe.yaml"), "--ckpt_path", "last"])


def assert_same_run(folder: Path, uninterrupted: Path, validations_lost: int = 0) -> None:
    """The resumed run ends on the uninterrupted run's weights, in one TensorBoard run folder whose curves are
    the uninterrupted run's (each step once, the same values), less the first ``validations_lost`` validations."""
    checkpoint = load_checkpoint_file(last_checkpoint(folder))
    assert checkpoint["global_step"] == BATCHES * OPTIMIZER_STEPS_PER_BATCH
    assert_same_weights(policy_weights(last_checkpoint(folder)), policy_weights(last_checkpoint(uninterrupted)))
    runs, curves = tensorboard_run(folder / "tb")
    expected_runs, expected = tensorboard_run(uninterrupted / "tb")
    assert runs == expected_runs == ["version_0"], runs
    assert [step for step, _ in expected["actor/pg_loss"]] == list(range(BATCHES))  # each batch logged once
    for tag in ("critic/score/mean", "actor/pg_loss", "actor/grad_norm"):
        assert curves[tag] == expected[tag], tag  # each step once, the same values
    assert curves["val/reward"] == expected["val/reward"][validations_lost:]
    assert temporaries(folder) == []  # a killed write's partial file is gone after the next good write


# ------------------------------------------------------------------------------------------------ SIGKILL
def test_sigkill_during_generation(tmp_path, tiny_model, uninterrupted):
    killed = run_killed(tmp_path, tiny_model, "generation", step=3)
    assert killed["forwards"] == 3 and killed["global_step"] == 3 * OPTIMIZER_STEPS_PER_BATCH
    assert load_checkpoint_file(last_checkpoint(tmp_path))["global_step"] == CHECKPOINT_EVERY
    resume(tmp_path)  # lost: batch 2 (trained and logged, not checkpointed) and batch 3's half-generated rollout
    assert_same_run(tmp_path, uninterrupted)


def test_sigkill_during_the_update(tmp_path, tiny_model, uninterrupted):
    killed = run_killed(tmp_path, tiny_model, "update", step=3)
    # one of batch 3's four optimiser steps was applied in memory, none saved
    assert killed["optimizer_steps_applied"] == 1 and killed["global_step"] == 3 * OPTIMIZER_STEPS_PER_BATCH + 1
    assert load_checkpoint_file(last_checkpoint(tmp_path))["global_step"] == CHECKPOINT_EVERY
    resume(tmp_path)  # lost: batch 2, and batch 3's rollout and partial update
    assert_same_run(tmp_path, uninterrupted)


def test_sigkill_during_a_checkpoint_write(tmp_path, tiny_model, uninterrupted):
    killed = run_killed(tmp_path, tiny_model, "checkpoint_write", step=3)  # the write after the last batch
    partial = Path(killed["file"])
    assert partial.name.startswith(".epoch=0-step=16.ckpt.") and partial.name.endswith(".tmp")
    assert partial.stat().st_size == killed["written"] < killed["size"]  # the kill landed inside the write
    previous = load_checkpoint_file(last_checkpoint(tmp_path))  # the last complete one is intact
    assert previous["global_step"] == CHECKPOINT_EVERY
    resume(tmp_path)  # lost: batches 2 and 3, trained again from the checkpoint of batch 1
    assert not partial.exists()
    assert_same_run(tmp_path, uninterrupted)


def test_sigkill_right_after_a_checkpoint_loses_no_logged_point(tmp_path, tiny_model, uninterrupted):
    """Killed right after batch 1's last.ckpt is renamed into place: Lightning logs a batch's metrics after every
    on_train_batch_end hook, ModelCheckpoint's included, so batch 1's points were lost for good (the resumed run
    starts at batch 2). They reach TensorBoard before the checkpoint now."""
    killed = run_killed(tmp_path, tiny_model, "after_last_checkpoint", step=1)
    assert killed["file"] == str(last_checkpoint(tmp_path)) and killed["global_step"] == CHECKPOINT_EVERY
    _, logged = tensorboard_run(tmp_path / "tb")
    assert [step for step, _ in logged["actor/pg_loss"]] == [0, 1]  # batch 1's points were on disk at the kill
    resume(tmp_path)  # lost: the validation that was due after batch 1 (as when killed during it)
    assert_same_run(tmp_path, uninterrupted, validations_lost=1)  # every training step once, batch 1's included


def test_sigkill_before_the_first_last_checkpoint_resumes_from_the_newest_intact_one(tmp_path, tiny_model,
                                                                                     uninterrupted):
    """Killed halfway through the first last.ckpt, after epoch=0-step=8.ckpt was complete: ``--ckpt_path last``
    started from scratch (Lightning finds no last*.ckpt); it resumes from that checkpoint and says so."""
    killed = run_killed(tmp_path, tiny_model, "last_checkpoint_write", step=1)
    assert Path(killed["file"]).name.startswith(".last.ckpt.") and killed["global_step"] == CHECKPOINT_EVERY
    assert not last_checkpoint(tmp_path).exists()
    newest = tmp_path / "checkpoints" / f"epoch=0-step={CHECKPOINT_EVERY}.ckpt"
    with pytest.warns(UserWarning, match=rf"holds no last.ckpt .*; resuming from the newest intact checkpoint there, "
                                         rf"{newest.name}"):
        resume(tmp_path)  # lost: the validation that was due after batch 1
    assert_same_run(tmp_path, uninterrupted, validations_lost=1)


def test_a_resumed_runs_events_file_sorts_after_the_interrupted_runs(tmp_path, monkeypatch):
    """TensorBoard orders a folder's events files by name: second, host, then process id. A run resumed within the
    second its interrupted run opened its file (a fast tiny run) was ordered by process id, and its points came
    before the ones its ``purge_step`` should have hidden (seen once in CI on test_sigkill_during_generation)."""
    now = int(time.time())
    interrupted = tmp_path / f"events.out.tfevents.{now:010d}.host.99999.0"
    interrupted.touch()
    wait_past_event_files(tmp_path)
    resumed = f"events.out.tfevents.{int(time.time()):010d}.host.10000.0"  # a lower pid, compared as text
    assert resumed > interrupted.name
    slept = []
    monkeypatch.setattr(relax_pl.cli.time, "sleep", slept.append)
    interrupted.rename(tmp_path / f"events.out.tfevents.{now + 3600:010d}.host.1.0")  # a clock set back an hour
    wait_past_event_files(tmp_path)
    assert slept == []


def test_sigkill_during_validation(tmp_path, tiny_model, uninterrupted):
    killed = run_killed(tmp_path, tiny_model, "validation", step=1)
    assert killed["validation_batch"] == 1 and killed["global_step"] == CHECKPOINT_EVERY
    resume(tmp_path)  # lost: the validation after batch 1 (its val/ points are not in TensorBoard)
    checkpoint = load_checkpoint_file(last_checkpoint(tmp_path))
    assert checkpoint["global_step"] == BATCHES * OPTIMIZER_STEPS_PER_BATCH
    assert_same_weights(policy_weights(last_checkpoint(tmp_path)), policy_weights(last_checkpoint(uninterrupted)))
    runs, curves = tensorboard_run(tmp_path / "tb")
    _, expected = tensorboard_run(uninterrupted / "tb")
    assert runs == ["version_0"]
    for tag in ("critic/score/mean", "actor/pg_loss"):
        assert curves[tag] == expected[tag], tag
    assert curves["val/reward"] == expected["val/reward"][1:]  # the second validation, the same values
    assert temporaries(tmp_path) == []


# ------------------------------------------------------------------------------------------------ the disk
def test_disk_full_during_a_checkpoint_write(tmp_path, tiny_model, monkeypatch):
    recipe = fault_recipe(tmp_path, tiny_model)
    checkpoints = tmp_path / "checkpoints"
    real_write = AtomicCheckpointIO.write

    def fill_the_disk(self, checkpoint, file) -> None:
        if checkpoint["global_step"] < 2 * CHECKPOINT_EVERY or ".last.ckpt." not in file.name:
            return real_write(self, checkpoint, file)
        file.write(b"\0" * 4096)  # part of it made it to the disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(AtomicCheckpointIO, "write", fill_the_disk)
    with pytest.raises(CheckpointWriteError) as raised:  # lost: the run stops (nothing is trained unsaved)
        main(["fit", "--config", str(recipe)])
    assert raised.value.errno == errno.ENOSPC
    assert str(raised.value) == (
        f"[Errno 28] could not write checkpoint '{checkpoints / 'last.ckpt'}': the disk is full (No space left on "
        "device); the previous last.ckpt is intact and the partial file was removed. Fix the cause (free disk space) "
        "and resume with --ckpt_path last"
    )
    assert temporaries(tmp_path) == []  # the partial file was removed at once
    assert load_checkpoint_file(checkpoints / "last.ckpt")["global_step"] == CHECKPOINT_EVERY  # intact

    # space freed: the run resumes, and after the next good writes no temporary file is left (nor one that a
    # writer killed earlier left behind)
    monkeypatch.setattr(AtomicCheckpointIO, "write", real_write)
    (checkpoints / f".last.ckpt.{2**22 + 1}@{socket.gethostname()}.tmp").write_bytes(b"a dead writer's")
    resume(tmp_path)
    assert load_checkpoint_file(checkpoints / "last.ckpt")["global_step"] == BATCHES * OPTIMIZER_STEPS_PER_BATCH
    assert temporaries(tmp_path) == []


@contextmanager
def small_tmpfs(folder: Path, size: int) -> Iterator[Path]:
    """A real file system of ``size`` bytes mounted at ``folder`` (root only; skips the test with the reason
    when it cannot be mounted)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="filling a real disk needs a small tmpfs, and mounting one needs root")
def test_really_full_disk_during_a_checkpoint_write(tmp_path, uninterrupted):
    """On a real full disk torch's zip writer raises RuntimeError("[enforce fail at inline_container.cc...]
    unexpected pos"), not OSError(ENOSPC). The disk is filled to leave 1/12 .. 11/12 of a checkpoint free (the write
    breaks at a different point each time): each write fails naming the file, "the disk is full" and that the
    previous last.ckpt is intact, leaves no partial file, and the previous checkpoint still loads."""
    checkpoint = load_checkpoint_file(last_checkpoint(uninterrupted))
    size = last_checkpoint(uninterrupted).stat().st_size
    io = AtomicCheckpointIO()
    with small_tmpfs(tmp_path / "disk", 3 * size) as disk:
        last = disk / "last.ckpt"
        io.save_checkpoint(checkpoint, last)
        for twelfths in range(1, 12):
            filler = disk / "filler"
            filler.unlink(missing_ok=True)
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            filler.write_bytes(b"\0" * (free - size * twelfths // 12))
            with pytest.raises(CheckpointWriteError) as raised:
                io.save_checkpoint({**checkpoint, "global_step": twelfths}, last)
            assert raised.value.errno == errno.ENOSPC, (twelfths, str(raised.value))
            assert str(raised.value).startswith(
                f"[Errno 28] could not write checkpoint '{last}': the disk is full (No space left on device); the "
                "previous last.ckpt is intact and the partial file was removed"
            ), (twelfths, str(raised.value))
            assert sorted(p.name for p in disk.iterdir()) == ["filler", "last.ckpt"]  # no partial file left
            assert load_checkpoint_file(last)["global_step"] == checkpoint["global_step"]  # the previous one, intact


def test_checkpoint_writes_fsync_the_file_then_rename_then_fsync_the_folder(tmp_path, monkeypatch):
    """Atomic and durable: the temporary file's bytes reach the disk (fsync) before the rename makes them the
    checkpoint, and the folder's entry reaches it (fsync of the folder) after; without either a power loss can
    leave an empty or missing last.ckpt although the rename happened."""
    import relax_pl.checkpointing as checkpointing

    calls = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        info = os.fstat(fd)
        calls.append(("fsync folder",) if stat.S_ISDIR(info.st_mode) else ("fsync file", info.st_size))
        fsync(fd)

    def spy_replace(source, target) -> None:
        calls.append(("replace", Path(source).name.startswith(".last.ckpt."), Path(target).name))
        replace(source, target)

    monkeypatch.setattr(checkpointing.os, "fsync", spy_fsync)
    monkeypatch.setattr(checkpointing.os, "replace", spy_replace)
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, tmp_path / "last.ckpt")
    size = (tmp_path / "last.ckpt").stat().st_size
    assert calls == [("fsync file", size), ("replace", True, "last.ckpt"), ("fsync folder",)]


def test_corrupt_last_checkpoint_names_the_newest_intact_one(tmp_path, tiny_model):
    recipe = fault_recipe(tmp_path, tiny_model)
    main(["fit", "--config", str(recipe), "--trainer.max_steps", str(2 * OPTIMIZER_STEPS_PER_BATCH),
          "--trainer.limit_val_batches", "0"])
    checkpoints = tmp_path / "checkpoints"
    last = checkpoints / "last.ckpt"
    data = last.read_bytes()
    damaged = {"truncated": data[: len(data) // 3], "garbled": data[:100] + os.urandom(len(data) - 100)}
    for damage, broken in damaged.items():
        last.write_bytes(broken)
        with pytest.raises(CheckpointError) as raised:
            resume(tmp_path)
        message = str(raised.value)
        assert f"checkpoint '{last}' is truncated or corrupt" in message, (damage, message)
        newest = checkpoints / "epoch=0-step=8.ckpt"
        assert f"the newest intact checkpoint there is '{newest}': resume with --ckpt_path {newest}" in message
    # and that checkpoint resumes; Lightning leaves the corrupt last.ckpt and writes last-v1.ckpt, which
    # --ckpt_path last then picks (the newest last*.ckpt)
    main(["fit", "--config", str(recipe), "--ckpt_path", str(checkpoints / "epoch=0-step=8.ckpt"),
          "--trainer.limit_val_batches", "0"])
    newest_last = max(checkpoints.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    assert newest_last.name == "last-v1.ckpt"
    assert load_checkpoint_file(newest_last)["global_step"] == BATCHES * OPTIMIZER_STEPS_PER_BATCH


# ------------------------------------------------------------------------------------------------ the step
def test_reward_that_raises_returns_nan_or_no_overall(tmp_path, tiny_model):
    """Through the CLI: about half the responses make the reward raise, return NaN, return no "overall" or hang;
    every step goes on, the failures are counted per step and in total, and the others still train."""
    flaky = {"class_path": "probes.FlakyReward", "init_args": {"timeout_s": 0.5, "hang_first": True}}
    recipe = fault_recipe(tmp_path, tiny_model, reward=flaky)
    with pytest.warns(UserWarning, match="the reward failed on"):
        main(["fit", "--config", str(recipe), "--trainer.max_steps", "8", "--trainer.limit_val_batches", "0"])
    logged = tensorboard_logs(tmp_path)[0]
    assert load_checkpoint_file(last_checkpoint(tmp_path))["global_step"] == 8  # the run went on
    assert len(logged["reward/errors"]) == 2 and sum(logged["reward/errors"]) >= 2
    assert sum(logged["reward/timeouts"]) >= 1
    assert logged["reward/failures_total"][-1] == sum(logged["reward/errors"]) + sum(logged["reward/timeouts"])
    assert moved_weights(policy_weights(last_checkpoint(tmp_path)), tiny_model)


def test_reward_that_fails_on_every_response_stops_the_run(tmp_path, tiny_model):
    """A reward that raises on every response trained on nothing while the run "succeeded": after
    ``model.max_failed_reward_steps`` such steps in a row the run stops, naming the reward and its first error."""
    recipe = fault_recipe(tmp_path, tiny_model, reward={"class_path": "probes.BrokenReward"}, max_failed_reward_steps=2)
    with pytest.warns(UserWarning, match="the reward failed on 8 response"), pytest.raises(RewardFailedError) as raised:
        main(["fit", "--config", str(recipe), "--trainer.limit_val_batches", "0"])
    assert str(raised.value) == (
        "the reward BrokenReward failed on every response of 2 training steps in a row "
        "(model.max_failed_reward_steps=2); its first error: KeyError: 'solution'"
    )
    assert tensorboard_logs(tmp_path)[0]["reward/errors"] == [8.0]  # step 0 trained on nothing; step 1 stopped


def test_non_finite_loss_skips_the_update(tmp_path, tiny_model):
    """A NaN loss in batch 1: its optimiser steps are skipped and counted, the weights leave batch 1 as they came
    in, and the batches around it train."""
    probe = {"class_path": "probes.NonFiniteLossAt", "init_args": {"step": 1}}
    recipe = fault_recipe(tmp_path, tiny_model, [probe])
    cli = main(["fit", "--config", str(recipe), "--trainer.max_steps", "12", "--trainer.limit_val_batches", "0"])
    nan_probe = next(cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteLossAt))
    assert nan_probe.unchanged is True and nan_probe.changed == [True, True, True]
    logged = tensorboard_logs(tmp_path)[0]
    assert logged["actor/skipped_updates"] == [0.0, 1.0, 0.0, 0.0]  # the fraction of the batch's steps skipped
    assert logged["actor/skipped_updates_total"] == [0.0, 4.0, 4.0, 4.0]
    assert cli.trainer.global_step == 12  # skipped steps do not count: batch 3 made up for batch 1


# ------------------------------------------------------------------------------------------------ hostile files
class RunsCode:
    """Unpickling this runs a shell command: what a malicious "checkpoint" would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_carries_code_is_refused(tmp_path, tiny_model, uninterrupted):
    """A checkpoint someone shared, with a pickle that would run a command: resuming, validating and exporting
    refuse it, naming the file, and the command never runs."""
    marker = tmp_path / "code_ran"
    evil = tmp_path / "shared.ckpt"
    checkpoint = load_checkpoint_file(last_checkpoint(uninterrupted))
    torch.save({**checkpoint, "extra": RunsCode(marker)}, evil)
    recipe = fault_recipe(tmp_path / "run", tiny_model)
    refused = rf"refused to load checkpoint '{evil}': its pickle calls posix.system"
    for subcommand in ("fit", "validate"):
        with pytest.raises(CheckpointError, match=refused):
            main([subcommand, "--config", str(recipe), "--ckpt_path", str(evil)])
    out = tmp_path / "export"
    export_command = [sys.executable, "-m", "relax_pl", "export", "--config", str(recipe), "--ckpt_path", str(evil),
                      "--out", str(out)]
    done = subprocess.run(export_command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    last_line = done.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"python -m relax_pl export: error: refused to load checkpoint '{evil}'"), last_line
    assert not marker.exists() and not out.exists()

    # a sharded checkpoint folder keeps its index in a plain pickle: refused the same way
    import pickle

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "sharded.ckpt"
    dcp.save({"state_dict": {"policy.lm_head.weight": torch.zeros(2, 2)}}, checkpoint_id=folder)
    index = pickle.loads((folder / ".metadata").read_bytes())
    index.planner_data["extra"] = RunsCode(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(index))
    refused = rf"refused to load sharded checkpoint '{folder}/.metadata': its index calls posix.system"
    with pytest.raises(CheckpointError, match=refused):
        export(recipe, folder, tmp_path / "export_sharded")
    assert not marker.exists()


def test_checkpoint_that_imports_by_opcode_is_refused_as_carrying_code(tmp_path):
    """A pickle that imports with STACK_GLOBAL (what protocols 4 and 5 write) is refused by torch with
    "Unsupported operand 147" and advice to load it with weights_only=False: it was reported as "truncated or
    corrupt" with that advice inside. It is named as carrying code, and the advice is turned round."""
    command = f"touch {tmp_path / 'ran'}".encode()
    calls_system = (  # os.system(command): PROTO 2, two strings, STACK_GLOBAL, the argument, TUPLE1, REDUCE, STOP
        b"\x80\x02X\x05\x00\x00\x00posixX\x06\x00\x00\x00system\x93X" + len(command).to_bytes(4, "little")
        + command + b"\x85R."
    )
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    shared = tmp_path / "shared.ckpt"
    with zipfile.ZipFile(tmp_path / "plain.ckpt") as plain, zipfile.ZipFile(shared, "w") as out:
        for item in plain.infolist():
            out.writestr(item, calls_system if item.filename.endswith("data.pkl") else plain.read(item.filename))
    pickle.loads(calls_system.replace(command, b"true".ljust(len(command))))  # the bytes are a working call
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint_file(shared)
    message = str(raised.value)
    assert message.startswith(f"refused to load checkpoint '{shared}': its pickle uses the opcode STACK_GLOBAL")
    assert "carries code" in message and "Do not load it with weights_only=False" in message
    assert "corrupt" not in message and "will likely succeed" not in message
    assert not (tmp_path / "ran").exists()


def test_checkpoint_hyperparameters_never_change_the_run(tmp_path, tiny_model, uninterrupted):
    """A shared checkpoint of plain data (it passes weights_only) whose hyper_parameters name another model with
    custom code and trust_remote_code: Lightning's CLI would copy them over the recipe. The recipe wins, the
    difference is reported naming both keys, and the other model's code never runs."""
    marker = tmp_path / "custom_code_ran"
    other = tmp_path / "model_with_custom_code"
    other.mkdir()
    (other / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}))
    (other / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    shared = tmp_path / "shared.ckpt"
    checkpoint = load_checkpoint_file(last_checkpoint(uninterrupted))
    torch.save({**checkpoint, "hyper_parameters": {"pretrained": str(other), "trust_remote_code": True}}, shared)
    recipe = fault_recipe(tmp_path / "run", tiny_model)
    for subcommand in ("validate", "fit"):
        with pytest.warns(UserWarning, match=r"\(model\.pretrained, model\.trust_remote_code\); they are ignored"):
            cli = main([subcommand, "--config", str(recipe), "--ckpt_path", str(shared)])
        assert cli.model.pretrained == str(tiny_model) and cli.model.trust_remote_code is False
        saved = yaml.safe_load(next((tmp_path / "run").rglob("config.yaml")).read_text())
        assert saved["model"]["pretrained"] == str(tiny_model) and saved["model"]["trust_remote_code"] is False
    assert not marker.exists()
