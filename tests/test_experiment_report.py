"""benchmarks/relax_vs_grpo.py, the experiment's evidence: its per-step record keeps what callbacks write straight to
the loggers, and its report pairs each arm with GRPO on the same seed and step (synthetic records with a known gap)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from relax_pl.callbacks.koopman_fit import log_metrics

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "relax_vs_grpo.py"


@pytest.fixture(scope="module")
def runner():
    spec = importlib.util.spec_from_file_location("relax_vs_grpo", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def fake_trainer(step: int, callback_metrics: dict, loggers: list) -> SimpleNamespace:
    loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step))
    return SimpleNamespace(callback_metrics=callback_metrics, loggers=loggers, fit_loop=loop)


def test_step_record_holds_metrics_written_straight_to_the_loggers(runner, tmp_path):
    logged = runner.LatestMetrics(tmp_path)
    record = runner.StepLog(tmp_path / "run.jsonl", logged=logged)
    trainer = fake_trainer(3, {"critic/score/mean": 0.25}, [logged])
    log_metrics(trainer, {"probes/effective_rank/all": 7.5, "repexp/bonus_mean": 0.125})  # as SpectrumMonitor does
    record.on_train_batch_end(trainer)
    trainer.fit_loop.epoch_loop._batches_that_stepped = 4
    record.on_train_batch_end(trainer)  # a step on which the callbacks logged nothing keeps no stale value
    first, second = (json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines())
    assert first == {"step": 3, "reward": 0.25, "probe_erank": 7.5, "repexp_bonus": 0.125}
    assert second == {"step": 4, "reward": 0.25}


def write_run(path: Path, rewards: list[float], erank: float) -> None:
    with path.open("w") as f:
        for step, reward in enumerate(rewards):
            f.write(json.dumps({"step": step, "reward": reward, "entropy": 0.5, "length": 40.0, "dsd": 1.0,
                                "probe_erank": erank}) + "\n")
        f.write(json.dumps({"done": True}) + "\n")


def test_report_pairs_each_arm_with_grpo_on_the_same_steps(runner, tmp_path):
    rng = random.Random(0)
    gaps = {1: -0.05, 2: 0.15}  # ReLaX-target - GRPO, the same at every step of a seed
    for seed, gap in gaps.items():
        grpo = [rng.uniform(0.2, 0.6) for _ in range(40)]
        write_run(tmp_path / f"GRPO-seed{seed}.jsonl", grpo, erank=6.0)
        write_run(tmp_path / f"ReLaX-target-seed{seed}.jsonl", [r + gap for r in grpo], erank=9.0)
    (tmp_path / "eval").mkdir()
    text = runner.report(tmp_path)
    [row] = [line for line in text.splitlines() if line.startswith("| ReLaX-target | 1,2 | ")
             and "[" in line]  # the paired table's row
    assert row.split(" | ")[2].startswith("+0.050 [-0.050, +0.150]")  # mean of the seeds, interval over seeds
    assert "-0.050, +0.150" in row.split(" | ")[3]  # per seed
    assert [line for line in text.splitlines() if line.startswith("| ReLaX-target | 1,2 | 9 |")]  # probe table
    assert (tmp_path / "relax_vs_grpo.png").stat().st_size > 0
