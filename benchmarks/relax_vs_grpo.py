"""ReLaX against vanilla GRPO on the quickstart task, same seed: reward, DSD, entropy and response length per step.

    python benchmarks/relax_vs_grpo.py                     # 20 steps each, about 2 x 10 minutes on 2 CPU cores
    python benchmarks/relax_vs_grpo.py --steps 2 --out /tmp/relax_vs_grpo.png

Runs recipes/quickstart.yaml and recipes/quickstart_relax.yaml one after the other (checkpoints, loggers and
validation off), writes a PNG of the per-step curves and prints the final numbers (mean of the last 5 steps).
DSD is measured the same way in both runs, on each step's rollout before the update, by KoopmanFit and
SpectrumMonitor with the ReLaX recipe's settings: in the GRPO run they only observe (no loss term, no global
random numbers drawn), so that run stays vanilla GRPO.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
from pathlib import Path

import lightning as L
import yaml
from matplotlib.figure import Figure

from relax_pl.callbacks import SpectrumMonitor
from relax_pl.cli import main

CURVES = {
    "critic/score/mean": "reward",
    "koopman/dsd_mean": "DSD (mean over the rollout)",
    "actor/entropy": "token entropy",
    "response_length/mean": "response length (tokens)",
}
TABLE = [*CURVES, "relax/gated_frac", "relax/valid_frac", "timing_s/step"]


class StepRecorder(L.Callback):
    """Each step's logged metrics, plus SpectrumMonitor's measurement (written to loggers, which are off)."""

    def __init__(self, monitor: SpectrumMonitor) -> None:
        self.monitor = monitor
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append({**{k: float(v) for k, v in trainer.callback_metrics.items()}, **self.monitor.last_metrics})


def relax_callbacks(recipe: str, names: list[str]) -> list[L.Callback]:
    """The recipe's callbacks named ``names``, built from their init_args; SpectrumMonitor measures every step."""
    built = []
    for entry in yaml.safe_load(Path(recipe).read_text())["trainer"]["callbacks"]:
        module_name, _, class_name = entry["class_path"].rpartition(".")
        if class_name not in names:
            continue
        init_args = dict(entry.get("init_args", {}))
        if class_name == "SpectrumMonitor":
            init_args["every_n_steps"] = 1
        built.append(getattr(importlib.import_module(module_name), class_name)(**init_args))
    missing = set(names) - {type(cb).__name__ for cb in built}
    if missing:
        raise ValueError(f"{recipe} has no {sorted(missing)} in trainer.callbacks")
    return built


def run(config: str, callbacks: list[L.Callback], steps: int, seed: int) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        cli = main(
            ["--config", config, f"--seed_everything={seed}", f"--trainer.max_steps={steps}", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
             f"--trainer.default_root_dir={out}", "--trainer.callbacks=[]"],
            run=False,
        )
        recorder = StepRecorder(next(cb for cb in callbacks if isinstance(cb, SpectrumMonitor)))
        cli.trainer.callbacks.extend([*callbacks, recorder])
        cli.trainer.fit(cli.model, cli.datamodule)
    return recorder.steps


def plot(runs: dict[str, list[dict[str, float]]], path: Path) -> None:
    figure = Figure(figsize=(11, 7), dpi=110)
    for ax, (key, title) in zip(figure.subplots(2, 2).flat, CURVES.items()):
        for name, steps in runs.items():
            ax.plot([s.get(key, float("nan")) for s in steps], marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)


def table(runs: dict[str, list[dict[str, float]]], last: int = 5) -> str:
    rows = [f"{'metric (mean of last %d steps)' % last:<34}" + "".join(f"{name:>14}" for name in runs)]
    for key in TABLE:
        cells = []
        for steps in runs.values():
            values = [s[key] for s in steps[-last:] if key in s]
            cells.append(f"{statistics.fmean(values):>14.4g}" if values else f"{'-':>14}")
        rows.append(f"{key:<34}" + "".join(cells))
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpo", default="recipes/quickstart.yaml")
    parser.add_argument("--relax", default="recipes/quickstart_relax.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="runs/relax_vs_grpo.png")
    args = parser.parse_args()
    observers = ["KoopmanFit", "SpectrumMonitor"]
    runs = {
        "GRPO": run(args.grpo, relax_callbacks(args.relax, observers), args.steps, args.seed),
        "ReLaX": run(args.relax, relax_callbacks(args.relax, [*observers, "LatentExploration"]), args.steps, args.seed),
    }
    plot(runs, Path(args.out))
    print(f"\n{args.steps} steps each, seed {args.seed}; curves in {args.out}")
    print(table(runs))
