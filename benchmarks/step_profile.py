"""Time per phase and tokens/s of one configuration (default: the quickstart), measured over a few steps.

    python benchmarks/step_profile.py                       # recipes/quickstart.yaml, 4 steps
    python benchmarks/step_profile.py --config recipes/quickstart.yaml --steps 6

The first step includes one-off costs (allocator warm-up, the reward worker's start) and is shown apart.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import lightning as L

from relax_pl.cli import main

PHASES = ["gen", "reward", "old", "ref", "update", "step"]


class StepRecorder(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def profile(config: str, steps: int, extra: list[str]) -> list[dict[str, float]]:
    with tempfile.TemporaryDirectory() as out:
        cli = main(
            ["--config", config, f"--trainer.max_steps={steps}", "--trainer.logger=false",
             "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0",
             f"--trainer.default_root_dir={out}", "--trainer.callbacks=[]", *extra],
            run=False,
        )
        recorder = StepRecorder()
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, cli.datamodule)
    return recorder.steps


def table(steps: list[dict[str, float]]) -> str:
    rest = steps[1:] or steps
    rows = [f"{'phase':<24}{'first step':>12}{'median (rest)':>16}{'share':>8}"]
    step_median = statistics.median(s["timing_s/step"] for s in rest)
    for phase in PHASES:
        key = f"timing_s/{phase}"
        if key not in steps[0]:
            continue
        median = statistics.median(s.get(key, 0.0) for s in rest)
        rows.append(f"{key:<24}{steps[0][key]:>11.2f}s{median:>15.2f}s{median / step_median:>8.0%}")
    for key in ["perf/gen_tokens_per_s", "perf/throughput", "response_length/mean", "perf/max_rss_gb"]:
        median = statistics.median(s[key] for s in rest)
        rows.append(f"{key:<24}{steps[0][key]:>12.1f}{median:>16.1f}")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=4)
    args, extra = parser.parse_known_args()
    recorded = profile(args.config, args.steps, extra)
    print(f"\n{args.config}: {len(recorded)} steps")
    print(table(recorded))
