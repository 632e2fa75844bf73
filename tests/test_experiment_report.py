"""benchmarks/relax_vs_grpo.py, the experiment's evidence: its per-step record keeps what callbacks write straight to
the loggers, and its report pairs each arm with GRPO on the same seed and step (synthetic records with a known gap)."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

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


class StepIndexModule(L.LightningModule):
    """Logs its step's index as the reward, and a probe straight to the loggers, as relax_pl's module and probes do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        self.log("critic/score/mean", float(batch_idx), batch_size=1)
        log_metrics(self.trainer, {"probes/effective_rank/all": 10.0 + batch_idx})
        return (self.weight - batch).pow(2).sum()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.ones(4, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_each_record_holds_its_own_steps_metrics_in_a_real_fit(runner, tmp_path):
    """Lightning gives the loggers a step's metrics after ``on_train_batch_end``: the record of step t once held step
    t - 1's trainer metrics beside step t's probes, and the last step's were never written."""
    logged = runner.LatestMetrics(tmp_path)
    trainer = L.Trainer(max_steps=4, logger=[logged], callbacks=[runner.StepLog(tmp_path / "run.jsonl", logged=logged)],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1)
    trainer.fit(StepIndexModule())
    records = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward"], r["probe_erank"]) for r in records] == [(t, t, 10.0 + t) for t in range(4)]


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


def test_report_pairs_against_another_arm(runner, tmp_path):
    rng = random.Random(0)
    for seed in (1, 2):
        grpo = [rng.uniform(0.2, 0.6) for _ in range(40)]
        write_run(tmp_path / f"GRPO-seed{seed}.jsonl", grpo, erank=6.0)
        write_run(tmp_path / f"Entropy-seed{seed}.jsonl", [r + 0.1 for r in grpo], erank=6.0)
        write_run(tmp_path / f"ReLaX-target-seed{seed}.jsonl", [r + 0.04 for r in grpo], erank=9.0)
        for arm, pass_at_k in (("Entropy", [0.0, 1.0, 0.5, 0.5]), ("ReLaX-target", [1.0, 1.0, 0.5, 0.0])):
            per_prompt = {"mean@1": [0.5] * 4, "mean@k": [0.25] * 4, "pass@k": pass_at_k}
            figures = {k: {"value": sum(v) / 4} for k, v in per_prompt.items()}
            folder = tmp_path / "eval" / f"{arm}-seed{seed}"
            folder.mkdir(parents=True)
            (folder / "evaluation.json").write_text(json.dumps(
                {"checkpoints": [{"per_prompt": per_prompt, "figures": figures}]}))
    text = runner.report(tmp_path, reference="Entropy")
    assert "Paired against Entropy" in text and "Paired against GRPO" not in text
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[2] for line in text.splitlines()
            if line.startswith("| ") and " | 1,2 | " in line and "[" in line}
    assert rows["ReLaX-target"].startswith("-0.060 [-0.060, -0.060]")
    [relax_row] = [line for line in text.splitlines() if line.startswith("| ReLaX-target | 1,2 | -0.060")]
    mean_at_1, mean_at_k, pass_at_k = relax_row.split(" | ")[4:7]  # held-out, per prompt, against Entropy
    assert mean_at_1.startswith("+0.000") and mean_at_k.startswith("+0.000") and pass_at_k.startswith("+0.125 [")
    assert rows["GRPO"].startswith("-0.100 [-0.100, -0.100]")
    assert "Entropy" not in rows


def test_records_written_before_the_fix_are_realigned_once(tmp_path):
    """What the old StepLog wrote for steps 0-5 with a resume at step 3: each process's first record right, later ones
    one step late, and ``grad_share`` first logged on step 1 (so the second record's is step 1's own)."""
    spec = importlib.util.spec_from_file_location("realign", BENCHMARK.parent / "realign_lagged_records.py")
    realign = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(realign)

    def true(t):
        return {"reward": t / 10, "step_s": 100.0 + t, **({"grad_share": t / 100} if t else {})}

    def written(t, first):
        return {"step": t, **(true(t) if first else {**true(t), **true(t - 1)}), "probe_erank": 10.0 + t}

    old = [written(0, True), written(1, False), written(2, False), written(3, True), written(4, False),
           written(5, False)]
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*old[:3], {"validation_step": 2}, *old[3:]]))
    assert realign.realign_file(path)
    fixed = [json.loads(line) for line in path.read_text().splitlines()]
    assert fixed[3] == {"validation_step": 2}
    steps = [r for r in fixed if "step" in r]
    lost = {2, 5}  # the last step of each process: its trainer metrics were never written
    assert steps == [{"step": t, **({} if t in lost else true(t)), "probe_erank": 10.0 + t} for t in range(6)]
    assert not realign.realign_file(path)  # nothing left to realign
