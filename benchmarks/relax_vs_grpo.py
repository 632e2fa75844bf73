"""ReLaX against GRPO on the embedded model: the paper's Figure 3 at small scale.

    python benchmarks/relax_vs_grpo.py                       # 2 seeds x {ReLaX, GRPO} x 30 RL steps, 1.5-2 h on 2 cores
    python benchmarks/relax_vs_grpo.py --steps 2 --seeds 1 --out /tmp/rvg --tiny    # smoke run, a tiny random model

Runs ``--recipe`` (default recipes/relax_small.yaml: SmolLM2-135M-Instruct on built-in word problems answered
with a few sentences of reasoning) as it is (ReLaX) and with LatentExploration's terms switched off
(``alpha = 0``, ``kl_coef = 0``): it then still measures DSD on the update's own forward, in the same units, but
adds nothing to the loss and draws no random number, so that run is vanilla GRPO. Every seed and method runs in
its own process, one after the other; every step appends a line to ``<out>/<method>-seed<k>.jsonl``, so a run
cut short keeps what it did, and a run already complete is not run again. At the end it writes
``<out>/relax_vs_grpo.png`` (per-step curves: mean over seeds, shaded range) and prints the table the README shows:
means over the last 10 steps, per seed and over seeds, and the last validation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import lightning as L

STEP_KEYS = {
    "critic/score/mean": "reward",
    "reward/accuracy": "accuracy",
    "actor/entropy": "entropy",
    "response_length/mean": "length",
    "relax/dsd_mean": "dsd",
    "relax/dsd_median": "dsd_median",
    "relax/valid_frac": "valid_frac",
    "relax/gated_frac": "gated_frac",
    "relax/grad_share": "grad_share",
    "relax/xi": "xi",
    "actor/grad_norm": "grad_norm",
    "timing_s/step": "step_s",
    "timing_s/gen": "gen_s",
    "timing_s/ref": "ref_s",
    "timing_s/update": "update_s",
}
VALIDATION_KEYS = ("val/accuracy", "val/reward", "val/accuracy/greedy")  # plus val/accuracy/pass@k
LAST = 10


class StepLog(L.Callback):
    """Appends each step's metrics (and each validation's) to a JSON-lines file as soon as they exist."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, *args) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        record = {short: metrics[key] for key, short in STEP_KEYS.items() if key in metrics}
        self.write({"step": trainer.fit_loop.epoch_loop._batches_that_stepped, **record})

    def on_validation_end(self, trainer, *args) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        record = {k: v for k, v in metrics.items() if k in VALIDATION_KEYS or "/pass@" in k}
        self.write({"validation_step": trainer.fit_loop.epoch_loop._batches_that_stepped, **record})


def run_one(recipe: str, method: str, seed: int, steps: int, out: Path, extra: list[str], alpha: float | None) -> None:
    """One fit, in this process."""
    from relax_pl.callbacks import LatentExploration
    from relax_pl.cli import main

    path = out / f"{method}-seed{seed}.jsonl"
    path.unlink(missing_ok=True)
    cli = main(
        ["--config", recipe, f"--seed_everything={seed}", f"--trainer.max_steps={steps}", "--trainer.logger=false",
         f"--trainer.default_root_dir={out / 'root'}", *extra],
        run=False,
    )
    cli.trainer.callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, L.pytorch.callbacks.ModelCheckpoint)]
    explore = [cb for cb in cli.trainer.callbacks if isinstance(cb, LatentExploration)]
    if len(explore) != 1:
        raise ValueError(f"{recipe} must have one LatentExploration callback, found {len(explore)}")
    if method == "GRPO":  # observe only: no loss term, no reference forward
        explore[0].alpha, explore[0].kl_coef = 0.0, 0.0
    elif alpha is not None:
        explore[0].alpha = alpha
    cli.trainer.callbacks.append(StepLog(path))
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    StepLog(path).write({"done": True, "seconds": time.perf_counter() - start})


def read(path: Path) -> tuple[list[dict], list[dict], bool]:
    steps, validations, done = [], [], False
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if "done" in record:
                done = True
            elif "validation_step" in record:
                validations.append(record)
            else:
                steps.append(record)
    return steps, validations, done


def mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def last_mean(steps: list[dict], key: str) -> float:
    return mean([s.get(key) for s in steps[-LAST:]])


def length_adjusted_ratio(method_runs: dict, grpo_runs: dict) -> float:
    """exp(b) of the least-squares fit ``log DSD = a + c log length + b [method]`` over every step of both methods.

    In the authors' units a response's DSD depends on its length (it is padded to ``max_new_tokens``, and the
    shorter it is, the more of K the padding decides), and both methods' answers shrink as they learn; this ratio
    compares the methods at equal mean length."""
    import numpy as np

    rows = [(1.0 if runs is method_runs else 0.0, math.log(s["length"]), math.log(s["dsd"]))
            for runs in (method_runs, grpo_runs) for steps, _ in runs.values() for s in steps
            if s.get("dsd", 0) > 0 and s.get("length", 0) > 0]
    indicator, log_length, log_dsd = (np.array(column) for column in zip(*rows))
    design = np.stack([np.ones_like(log_length), log_length, indicator], axis=1)
    coef, *_ = np.linalg.lstsq(design, log_dsd, rcond=None)
    return float(np.exp(coef[2]))


def table(runs: dict[str, dict[int, tuple[list[dict], list[dict]]]]) -> str:
    keys = ["dsd", "entropy", "reward", "accuracy", "length", "gated_frac", "grad_share"]
    header = ["method", "seed", "steps"] + [f"{k} (last {LAST})" for k in keys] + ["val mean@k", "val pass@k"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary: dict[str, dict[str, float]] = {}
    for method, seeds in runs.items():
        per_seed = []
        for seed, (steps, validations) in sorted(seeds.items()):
            row = {k: last_mean(steps, k) for k in keys}
            final = validations[-1] if validations else {}
            row["val"] = final.get("val/accuracy", math.nan)
            row["pass"] = next((v for k, v in final.items() if "/pass@" in k), math.nan)
            per_seed.append(row)
            lines.append(f"| {method} | {seed} | {len(steps)} | " + " | ".join(f"{row[k]:.4g}" for k in keys)
                         + f" | {row['val']:.3f} | {row['pass']:.3f} |")
        summary[method] = {k: mean([r[k] for r in per_seed]) for k in [*keys, "val", "pass"]}
        lines.append(f"| **{method}** | mean | | " + " | ".join(f"**{summary[method][k]:.4g}**" for k in keys)
                     + f" | **{summary[method]['val']:.3f}** | **{summary[method]['pass']:.3f}** |")
    if "GRPO" in summary:
        grpo = summary["GRPO"]
        for method in [m for m in summary if m != "GRPO"]:
            relax = summary[method]
            lines.append(f"\n{method} / GRPO over the last {LAST} steps: DSD {relax['dsd'] / grpo['dsd']:.2f}x, entropy "
                         f"{relax['entropy'] / grpo['entropy']:.2f}x, reward {relax['reward'] - grpo['reward']:+.3f}")
        for method in [m for m in summary if m != "GRPO"]:
            ratio = length_adjusted_ratio(runs[method], runs["GRPO"])
            lines.append(f"{method} / GRPO at equal response length (all steps): DSD {ratio:.2f}x")
        grpo_rewards = [last_mean(steps, "reward") for steps, _ in runs["GRPO"].values()]
        lines.append(f"GRPO's seed-to-seed range of reward: {min(grpo_rewards):.3f} to {max(grpo_rewards):.3f}")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, tuple[list[dict], list[dict]]]], path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [("dsd", "DSD (authors' units, log scale)", True), ("entropy", "token entropy", False),
              ("reward", "training reward", False), ("val", "validation: mean@k (o) and pass@k (^)", False),
              ("gated_frac", "gated fraction (DSD > xi)", False), ("grad_share", "grad_share (|alpha L_xp| / |rest|)", True),
              ("length", "response length (tokens)", False), ("valid_frac", "responses with a defined DSD", False)]
    figure = Figure(figsize=(16, 7.5), dpi=100)
    palette = iter(["tab:red", "tab:orange", "tab:purple", "tab:green"])
    colors = {m: "tab:blue" if m == "GRPO" else next(palette) for m in runs}
    for ax, (key, title, log) in zip(figure.subplots(2, 4).flat, panels):
        for method, seeds in runs.items():
            if key == "val":
                for marker, pick in (("o", lambda r: r.get("val/accuracy")),
                                     ("^", lambda r: next((v for k, v in r.items() if "/pass@" in k), None))):
                    points = {}
                    for _, validations in seeds.values():
                        for r in validations:
                            points.setdefault(r["validation_step"], []).append(pick(r))
                    xs = sorted(points)
                    ax.plot(xs, [mean(points[x]) for x in xs], marker=marker, color=colors[method],
                            label=f"{method} {'mean@k' if marker == 'o' else 'pass@k'}")
                continue
            length = max(len(steps) for steps, _ in seeds.values())
            xs, mid, low, high = [], [], [], []
            for i in range(length):
                values = [steps[i].get(key) for steps, _ in seeds.values() if i < len(steps)]
                values = [v for v in values if v is not None and math.isfinite(v)]
                if values:
                    xs.append(i + 1)
                    mid.append(statistics.fmean(values))
                    low.append(min(values))
                    high.append(max(values))
            if xs:
                ax.plot(xs, mid, color=colors[method], label=f"{method} ({len(seeds)} seeds)")
                ax.fill_between(xs, low, high, color=colors[method], alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/relax_small.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2, help="seeds 1..N for each method")
    parser.add_argument("--out", default="runs/relax_vs_grpo")
    parser.add_argument("--alpha", type=float, help="ReLaX's alpha instead of the recipe's (the method is named ReLaX-alpha<a>)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (run `python -m relax_pl.testing runs/tiny_qwen2` first)")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SEED"), help=argparse.SUPPRESS)  # a child process
    parser.add_argument("extra", nargs="*", help="recipe overrides passed to every run, e.g. --model.optimizer.lr=1e-5")
    args, unknown = parser.parse_known_args()
    extra = [*args.extra, *unknown, *(["--model.pretrained=runs/tiny_qwen2"] if args.tiny else [])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = ("ReLaX" if args.alpha is None else f"ReLaX-alpha{args.alpha:g}", "GRPO")
    if args.one:
        run_one(args.recipe, args.one[0], int(args.one[1]), args.steps, out, extra, args.alpha)
        sys.exit(0)
    for seed in range(1, args.seeds + 1):
        for method in methods:
            if read(out / f"{method}-seed{seed}.jsonl")[2]:
                print(f"{method} seed {seed}: complete, kept", flush=True)
                continue
            print(f"{method} seed {seed}: running {args.steps} steps", flush=True)
            command = [sys.executable, __file__, "--recipe", args.recipe, "--steps", str(args.steps), "--out", str(out),
                       "--one", method, str(seed), *(["--alpha", str(args.alpha)] if args.alpha is not None else []), *extra]
            if subprocess.run(command).returncode:
                print(f"{method} seed {seed}: failed; its steps so far are kept in {out}", flush=True)
    methods = sorted({p.name.rsplit("-seed", 1)[0] for p in out.glob("*-seed*.jsonl")}, key=lambda m: (m == "GRPO", m))
    runs = {m: {} for m in methods}
    for method in methods:
        for seed in range(1, args.seeds + 1):
            steps, validations, _ = read(out / f"{method}-seed{seed}.jsonl")
            if steps:
                runs[method][seed] = (steps, validations)
    runs = {m: s for m, s in runs.items() if s}
    plot(runs, out / "relax_vs_grpo.png")
    print(f"\n{args.recipe}, {args.steps} RL steps, seeds 1-{args.seeds}; curves in {out / 'relax_vs_grpo.png'}\n")
    print(table(runs))
