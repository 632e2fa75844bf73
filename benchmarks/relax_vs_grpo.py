"""ReLaX against GRPO and the token-level baselines, arms x seeds, paired, resumable.

    python benchmarks/relax_vs_grpo.py                                  # every run of RUN_ORDER (the whole experiment)
    python benchmarks/relax_vs_grpo.py --runs GRPO:1 ReLaX-target:1     # these runs only, in this order
    python benchmarks/relax_vs_grpo.py --report                         # the table and figure from what exists
    python benchmarks/relax_vs_grpo.py --report --against Entropy       # every arm paired with Entropy instead
    python benchmarks/relax_vs_grpo.py --runs GRPO:1 ReLaX:1 --steps 2 --eval_prompts 4 --eval_samples 2 \\
        --records /tmp/rvg --checkpoints /tmp/rvg_runs --tiny           # smoke run on a tiny random model

Every run is ``recipes/relax_small.yaml`` (SmolLM2-135M-Instruct on built-in word problems, CPU) changed as its arm
says (:data:`ARMS`), for ``--steps`` optimiser steps with seed ``k``: arms of one seed see the same prompts in the
same order. Every arm keeps LatentExploration, so DSD is measured the same way in all of them; the arms that are
not ReLaX run it with ``alpha = 0`` and ``kl_coef = 0``, where it adds nothing to the loss and draws no random number.

A run is two phases, each its own process:

1. *train*: ``fit`` with a ``last.ckpt`` every ``--checkpoint_every`` rollouts under ``--checkpoints``; each step
   appends one line to ``<records>/<arm>-seed<k>.jsonl`` (each validation one more). A run cut short resumes from its
   ``last.ckpt`` (``--ckpt_path last``) and first drops the records after that checkpoint, which the resumed run
   writes again; a run whose records end with ``done`` is not trained again.
2. *evaluate*: ``python -m relax_pl evaluate`` on the final checkpoint over ``--eval_prompts`` held-out prompts
   (the recipe's validation source: half one-step problems as in training, half two-step), greedy and
   ``--eval_samples`` samples at T = 1, into ``<records>/eval/<arm>-seed<k>/evaluation.json``.

Running the same command again finishes what is unfinished and skips the rest, so the experiment can span several
sittings; commit ``<records>`` as it grows. ``--report`` (also printed at the end) writes
``<records>/relax_vs_grpo.png`` and prints per-seed means over the last 15 steps, paired differences against GRPO
(``--against``: another arm, e.g. a token-level baseline) with 95% intervals, and held-out mean@1 / mean@k / pass@k
with paired differences.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import Logger

STEP_KEYS = {
    "critic/score/mean": "reward",
    "reward/accuracy": "accuracy",
    "actor/entropy": "entropy",
    "response_length/mean": "length",
    "relax/dsd_mean": "dsd",
    "relax/dsd_median": "dsd_median",
    "relax/valid_frac": "valid_frac",
    "relax/over_frac": "over_frac",
    "relax/gated_frac": "gated_frac",
    "relax/grad_share": "grad_share",
    "relax/alpha": "alpha",
    "relax/xi": "xi",
    "actor/grad_norm": "grad_norm",
    "actor/pg_clipfrac": "clipfrac",
    "timing_s/step": "step_s",
    "timing_s/gen": "gen_s",
    "timing_s/ref": "ref_s",
    "timing_s/update": "update_s",
    # SpectrumMonitor's probes (every arm): the latent side-by-side of RepExp / effective rank / ReLaX
    "probes/effective_rank/all": "probe_erank",
    "probes/effective_rank/correct": "probe_erank_correct",
    "probes/effective_rank/incorrect": "probe_erank_incorrect",
    "probes/repexp_novelty/all": "probe_novelty",
    "probes/repexp_novelty/correct": "probe_novelty_correct",
    "probes/repexp_novelty/incorrect": "probe_novelty_incorrect",
    "probes/dsd_eig/all": "probe_dsd_eig",
    "probes/correct_frac": "probe_correct_frac",
    # the alternatives' own terms (their arms only)
    "repexp/bonus_mean": "repexp_bonus",
    "repexp/advantage_change": "repexp_adv_change",
    "er/bonus_mean": "er_bonus",
    "er/advantage_change": "er_adv_change",
}
LAST = 15  # the window of the paired reward difference


@dataclass
class Arm:
    """How an arm changes the recipe: command-line overrides, LatentExploration's arguments and callbacks it adds
    (``{"class_path": ..., "init_args": {...}}``)."""

    overrides: list[str] = field(default_factory=list)
    explore: dict = field(default_factory=dict)
    callbacks: list[dict] = field(default_factory=list)
    note: str = ""


OBSERVE_ONLY = {"alpha": 0.0, "kl_coef": 0.0}
ARMS = {
    "GRPO": Arm(explore=OBSERVE_ONLY, note="LatentExploration measures DSD only"),
    "ReLaX": Arm(note="the recipe: alpha 0.2, xi 25 absolute (the paper's bound, authors' units)"),
    "ReLaX-target": Arm(
        explore={"grad_share_target": 0.1, "xi_mode": "quantile", "xi_quantile": 0.8},
        note="alpha steered to grad_share 0.1 (the paper setting's push); the gate at the mini-batch's 80% quantile",
    ),
    "ReLaX-target-fail": Arm(
        explore={"grad_share_target": 0.1, "xi_mode": "quantile", "xi_quantile": 0.8, "failure_weighting": True},
        note="ReLaX-target with each group's L_xp weighted by its share of failed answers",
    ),
    "RepExp": Arm(
        explore=OBSERVE_ONLY,
        callbacks=[{"class_path": "relax_pl.callbacks.RepExp", "init_args": {
            "beta": 0.01, "lam": 0.01, "sparse_dim": 32, "redraw_projection": True, "gate_none_correct": True,
            "representation": "reference", "seed": 0}}],
        note="GRPO + RepExp's novelty bonus on the reward (as recipes/repexp_small.yaml)",
    ),
    "EffectiveRank": Arm(
        explore=OBSERVE_ONLY,
        callbacks=[{"class_path": "relax_pl.callbacks.EffectiveRankShaping", "init_args": {
            "stride": 8, "max_tokens": 512, "gain": 2.0, "weight": 1.0, "kappa": 2.0, "ema_rate": 0.3}}],
        note="GRPO + effective-rank advantage shaping (as recipes/effective_rank_small.yaml)",
    ),
    "Entropy": Arm(
        overrides=["--model.objective.entropy_coef=0.005"], explore=OBSERVE_ONLY,
        note="GRPO + a token-entropy bonus of 0.005",
    ),
    "ClipCov": Arm(
        overrides=['--model.objective.policy_loss={"class_path": "relax_pl.losses.ClipCov", "init_args": '
                   '{"clip_low": 0.2, "clip_high": 0.28, "ratio": 0.01, "bounds": [1.0, 5.0]}}'],
        explore=OBSERVE_ONLY,
        note="Clip-Cov with 1% of the tokens (the paper's 2e-4 selects no token of a 1,500-token step)",
    ),
}
# pairs first (GRPO and the ReLaX arms on the same seed), the baselines' seeds last: cut from the end
RUN_ORDER = [("GRPO", 1), ("ReLaX-target", 1), ("GRPO", 2), ("ReLaX-target", 2), ("ReLaX", 1), ("ReLaX", 2),
             ("GRPO", 3), ("ReLaX-target", 3), ("GRPO", 4), ("ReLaX-target", 4),
             ("Entropy", 1), ("ClipCov", 1), ("Entropy", 2), ("ClipCov", 2),
             ("RepExp", 1), ("EffectiveRank", 1), ("RepExp", 2), ("EffectiveRank", 2),
             # added after ReLaX-target's seed 2 (the push on nearly solved groups); seeds 3-4 once it came closest
             ("ReLaX-target-fail", 1), ("ReLaX-target-fail", 2), ("ReLaX-target-fail", 3), ("ReLaX-target-fail", 4)]


class LatestMetrics(Logger):
    """A logger that keeps the latest value of each metric written straight to the loggers (SpectrumMonitor's probes,
    RepExp's and effective-rank shaping's terms), which never reach ``trainer.callback_metrics``."""

    def __init__(self, save_dir: Path) -> None:
        super().__init__()
        self.latest: dict[str, float] = {}
        self._save_dir = str(save_dir)

    @property
    def save_dir(self) -> str:  # where Lightning's config.yaml of the run goes
        return self._save_dir

    @property
    def name(self) -> str:
        return "latest"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.latest.update({k: float(v) for k, v in metrics.items()})

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


class StepLog(L.Callback):
    """Appends each step's metrics (and each validation's) to a JSON-lines file as soon as they exist, with the
    step's valid DSDs and their advantages (to compare over-dispersion bounds offline). Runs before ModelCheckpoint
    (Lightning puts checkpoint callbacks last), so a checkpoint never holds a step without a record."""

    def __init__(self, path: Path, explore=None, logged: LatestMetrics | None = None) -> None:
        self.path, self.explore, self.logged = path, explore, logged

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, *args) -> None:
        metrics = {}
        if self.logged is not None:
            # Lightning hands a step's own metrics to the loggers after this hook, so ``latest`` holds the previous
            # step's under the same keys: the trainer's current values must win. Emptied here so that a callback
            # writing to the loggers only now and then leaves no stale value (``callback_metrics`` keeps a value
            # logged with ``module.log`` until the key is logged again, as Lightning does)
            metrics, self.logged.latest = self.logged.latest, {}
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
        record = {short: metrics[key] for key, short in STEP_KEYS.items() if key in metrics}
        if self.explore is not None:
            dsd, advantages = self.explore.step_dispersions()
            record.update(dsd_values=[round(v, 5) for v in dsd.tolist()],
                          adv_values=[round(v, 4) for v in advantages.tolist()])
        self.write({"step": trainer.fit_loop.epoch_loop._batches_that_stepped, **record})

    def on_validation_end(self, trainer, *args) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        self.write({"validation_step": trainer.fit_loop.epoch_loop._batches_that_stepped, **metrics})


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def keep_records_before(path: Path, step: int) -> None:
    """Drop the records of steps at or after ``step`` (what a run resumed from that checkpoint writes again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if json.loads(line).get("step", json.loads(line).get("validation_step", -1)) < step]
    path.write_text("".join(line + "\n" for line in kept))


def batches_done(checkpoint: dict) -> int:
    """The training batches (RL steps) a checkpoint holds: the step number of the first record a run resumed from it
    writes. Not ``global_step``, which counts optimiser steps (several per batch under the paper's schedule). The
    checkpoint is written in the batch's ``on_train_batch_end``, before Lightning counts that batch."""
    return checkpoint["loops"]["fit_loop"]["epoch_loop.state_dict"]["_batches_that_stepped"] + 1


def train(args: argparse.Namespace, arm_name: str, seed: int) -> None:
    """One run's fit, in this process, resumed from its ``last.ckpt`` when there is one."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from relax_pl.callbacks import LatentExploration
    from relax_pl.checkpointing import load_checkpoint_file
    from relax_pl.cli import main

    arm, name = ARMS[arm_name], run_name(arm_name, seed)
    records, folder = Path(args.records) / f"{name}.jsonl", Path(args.checkpoints) / name
    last = folder / "checkpoints" / "last.ckpt"
    resume_step = batches_done(load_checkpoint_file(last, mmap=True)) if last.exists() else 0
    keep_records_before(records, resume_step)
    cli = main(
        ["--config", args.recipe, f"--seed_everything={seed}", f"--trainer.max_steps={args.steps}",
         "--trainer.logger=false", f"--trainer.default_root_dir={folder}", *arm.overrides, *args.overrides],
        run=False,
    )
    callbacks = [cb for cb in cli.trainer.callbacks if not isinstance(cb, ModelCheckpoint)]
    [(index, explore)] = [(i, cb) for i, cb in enumerate(callbacks) if isinstance(cb, LatentExploration)]
    [given] = [c for c in cli.config.trainer.callbacks if c.class_path.endswith("LatentExploration")]
    callbacks[index] = explore = LatentExploration(**{**dict(given.init_args or {}), **arm.explore})
    for extra in arm.callbacks:
        module_name, class_name = extra["class_path"].rsplit(".", 1)
        callbacks.append(getattr(importlib.import_module(module_name), class_name)(**extra["init_args"]))
    # ModelCheckpoint counts optimiser steps; --checkpoint_every counts rollouts (the records' steps), which take
    # several optimiser steps each under the paper's schedule (recipes/relax_small_paper_schedule.yaml)
    update, responses = cli.model.update, cli.datamodule.batch_size * cli.model.sampling.num_responses
    per_rollout = update.ppo_epochs * -(-responses // (update.mini_batch_size or responses))
    checkpoint = ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True, save_top_k=0,
                                 every_n_train_steps=args.checkpoint_every * per_rollout)
    logged = LatestMetrics(folder)
    cli.trainer.loggers = [logged]
    cli.trainer.callbacks = [*callbacks, StepLog(records, explore, logged), checkpoint]
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule, ckpt_path="last" if last.exists() else None)
    StepLog(records).write({"done": True, "seconds": time.perf_counter() - start, "resumed_from": resume_step})


def evaluate(args: argparse.Namespace, arm_name: str, seed: int) -> int:
    name = run_name(arm_name, seed)
    command = [sys.executable, "-m", "relax_pl", "evaluate", "--config", args.recipe,
               "--ckpt_path", str(Path(args.checkpoints) / name / "checkpoints" / "last.ckpt"),
               "--num_samples", str(args.eval_samples), "--max_prompts", str(args.eval_prompts),
               "--seed", "0", "--out", str(Path(args.records) / "eval" / name), *args.overrides]
    return subprocess.run(command).returncode


# ------------------------------------------------------------------------------------------------ reading
def read_run(path: Path) -> tuple[list[dict], list[dict], bool]:
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


def read_evaluation(records: Path, name: str) -> dict | None:
    path = records / "eval" / name / "evaluation.json"
    return json.loads(path.read_text())["checkpoints"][0] if path.exists() else None


def mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(values) if values else math.nan


def last_steps(steps: list[dict]) -> list[dict]:
    """The records of a run's last :data:`LAST` step numbers (25-39 of 40), the window of every figure of the report.
    A step may lack the trainer metrics (records written before the StepLog fix miss the step before each resume:
    benchmarks/realign_lagged_records.py); a figure takes the steps that have it."""
    end = max(s["step"] for s in steps)
    return [s for s in steps if s["step"] > end - LAST]


def last_mean(steps: list[dict], key: str) -> float:
    return mean([s.get(key) for s in last_steps(steps)])


def interval(resample, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """The 2.5% and 97.5% quantiles of ``resample(rng)`` over ``draws`` bootstrap draws."""
    rng = random.Random(seed)
    values = sorted(resample(rng) for _ in range(draws))
    return values[int(0.025 * draws)], values[int(0.975 * draws) - 1]


def paired_reward(arm_runs: dict[int, list[dict]], reference_runs: dict[int, list[dict]]) -> dict:
    """Per seed and over seeds: arm - reference training reward, step by step over the last :data:`LAST` steps of
    both. The interval over seeds resamples seeds, then steps within each (a two-level bootstrap)."""
    diffs = {}
    for seed in sorted(set(arm_runs) & set(reference_runs)):
        a, g = ({s["step"]: s["reward"] for s in last_steps(runs[seed]) if "reward" in s}
                for runs in (arm_runs, reference_runs))
        common = sorted(set(a) & set(g))
        if common:
            diffs[seed] = [a[t] - g[t] for t in common]
    result = {"per_seed": {s: mean(d) for s, d in diffs.items()}}
    if diffs:
        seeds = list(diffs)

        def draw(rng):
            chosen = [diffs[rng.choice(seeds)] for _ in seeds]
            return statistics.fmean(statistics.fmean(rng.choice(d) for _ in d) for d in chosen)

        result["mean"] = statistics.fmean(result["per_seed"].values())
        result["interval"] = interval(draw)
    return result


def paired_heldout(records: Path, arm: str, reference: str, seeds: list[int], metric: str) -> dict | None:
    """Held-out ``metric`` (``mean@1``, ``mean@k``, ``pass@k``), arm - reference: per seed, and per prompt averaged
    over the seeds both have, with a bootstrap interval over prompts (the evaluation set is the same for every run)."""
    from relax_pl.evaluation import bootstrap_interval

    per_prompt = []
    per_seed = {}
    for seed in seeds:
        a, g = read_evaluation(records, run_name(arm, seed)), read_evaluation(records, run_name(reference, seed))
        if a is None or g is None:
            continue
        da, dg = a["per_prompt"][metric], g["per_prompt"][metric]
        per_prompt.append([x - y for x, y in zip(da, dg)])
        per_seed[seed] = mean(da) - mean(dg)
    if not per_prompt:
        return None
    averaged = [statistics.fmean(column) for column in zip(*per_prompt)]
    return {"per_seed": per_seed, "mean": statistics.fmean(averaged), "interval": bootstrap_interval(averaged)}


def length_adjusted_ratio(method_runs: dict, reference_runs: dict) -> float:
    """exp(b) of the least-squares fit ``log DSD = a + c log length + b [method]`` over every step of both arms.

    In the authors' units a response's DSD depends on its length (it is padded to ``max_new_tokens``, and the
    shorter it is, the more of K the padding decides); this ratio compares the arms at equal mean length."""
    import numpy as np

    rows = [(1.0 if runs is method_runs else 0.0, math.log(s["length"]), math.log(s["dsd"]))
            for runs in (method_runs, reference_runs) for steps in runs.values() for s in steps
            if s.get("dsd", 0) > 0 and s.get("length", 0) > 0]
    indicator, log_length, log_dsd = (np.array(column) for column in zip(*rows))
    design = np.stack([np.ones_like(log_length), log_length, indicator], axis=1)
    coef, *_ = np.linalg.lstsq(design, log_dsd, rcond=None)
    return float(np.exp(coef[2]))


GATE_RULES = {  # name -> the bound of a step given its DSDs and the first step's (a quantile is the step's own)
    "absolute 25": lambda values, first: 25.0,
    "relative 2x": lambda values, first: 2.0 * statistics.median(first),
    "relative 3x": lambda values, first: 3.0 * statistics.median(first),
    "quantile 0.9": lambda values, first: quantile(values, 0.9),
    "quantile 0.8": lambda values, first: quantile(values, 0.8),
}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    return ordered[low] + (ordered[min(low + 1, len(ordered) - 1)] - ordered[low]) * (position - low)


def gate_rates(steps: list[dict]) -> dict[str, tuple[float, float, float]]:
    """For each rule of :data:`GATE_RULES`, over the steps that recorded their DSDs: the mean share of valid
    responses it gates (over the bound with A > 0, as ``gate_positive_only``), its range over steps, and the share of
    steps in which it gates at least one."""
    recorded = [s for s in steps if s.get("dsd_values")]
    if not recorded:
        return {}
    first = recorded[0]["dsd_values"]
    rates = {}
    for name, bound in GATE_RULES.items():
        shares = []
        for s in recorded:
            xi = bound(s["dsd_values"], first)
            shares.append(statistics.fmean(d > xi and a > 0 for d, a in zip(s["dsd_values"], s["adv_values"])))
        rates[name] = (statistics.fmean(shares), min(shares), max(shares), statistics.fmean(x > 0 for x in shares))
    return rates


def report(records: Path, reference: str = "GRPO") -> str:
    """The tables (every arm paired with ``reference`` on the seeds both ran) and the figure."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for path in sorted(records.glob("*-seed*.jsonl")):
        arm, seed = path.stem.rsplit("-seed", 1)
        steps, _, _ = read_run(path)
        if steps:
            runs.setdefault(arm, {})[int(seed)] = steps
    order = [a for a in ARMS if a in runs] + [a for a in runs if a not in ARMS]
    keys = ["reward", "accuracy", "dsd", "entropy", "length", "gated_frac", "grad_share", "alpha", "step_s"]
    lines = [f"Per run, means over the last {LAST} steps; held-out mean@1 (greedy) and mean@k / pass@k at T = 1", "",
             "| arm | seed | steps | " + " | ".join(keys) + " | held-out mean@1 | mean@k | pass@k |",
             "|" + "---|" * (len(keys) + 6)]
    for arm in order:
        for seed, steps in sorted(runs[arm].items()):
            evaluation = read_evaluation(records, run_name(arm, seed))
            held = [evaluation["figures"][k]["value"] if evaluation else math.nan
                    for k in ("mean@1", "mean@k", "pass@k")] if evaluation else [math.nan] * 3
            lines.append(f"| {arm} | {seed} | {len(steps)} | " + " | ".join(f"{last_mean(steps, k):.3g}" for k in keys)
                         + " | " + " | ".join(f"{v:.3f}" for v in held) + " |")
    if reference in runs:
        lines += ["", f"Paired against {reference} (same seed, same prompts): training reward over the last {LAST} "
                  "steps, held-out mean@1, mean@k and pass@k (per prompt, averaged over seeds); 95% bootstrap "
                  "intervals", "",
                  "| arm | seeds | reward diff [95%] | per seed | mean@1 diff [95%] | mean@k diff [95%] | "
                  f"pass@k diff [95%] | DSD x {reference} (equal length) | entropy x {reference} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for arm in [a for a in order if a != reference]:
            paired = paired_reward(runs[arm], runs[reference])
            if "mean" not in paired:
                continue
            seeds = sorted(paired["per_seed"])
            held = [paired_heldout(records, arm, reference, seeds, m) for m in ("mean@1", "mean@k", "pass@k")]
            held_text = [f"{h['mean']:+.3f} [{h['interval'][0]:+.3f}, {h['interval'][1]:+.3f}]" if h else "-"
                         for h in held]
            entropy = mean([last_mean(runs[arm][s], "entropy") for s in seeds]) / mean(
                [last_mean(runs[reference][s], "entropy") for s in seeds])
            ratio = length_adjusted_ratio({s: runs[arm][s] for s in seeds}, {s: runs[reference][s] for s in seeds})
            low, high = paired["interval"]
            lines.append(f"| {arm} | {','.join(map(str, seeds))} | {paired['mean']:+.3f} [{low:+.3f}, {high:+.3f}] | "
                         + ", ".join(f"{d:+.3f}" for d in paired["per_seed"].values())
                         + f" | {' | '.join(held_text)} | {ratio:.2f}x | {entropy:.2f}x |")
    probe_keys = ["probe_erank", "probe_erank_correct", "probe_erank_incorrect", "probe_novelty",
                  "probe_novelty_correct", "probe_novelty_incorrect", "probe_dsd_eig"]
    if any(s.get("probe_erank") is not None for seeds in runs.values() for steps in seeds.values() for s in steps):
        lines += ["", f"Latent probes (SpectrumMonitor, every arm; correct / incorrect answers), means over the last "
                  f"{LAST} steps and over seeds: effective rank of the hidden states, RepExp novelty within the group, "
                  "DSD (eig spectrum)", "",
                  "| arm | seeds | " + " | ".join(probe_keys) + " |", "|" + "---|" * (len(probe_keys) + 2)]
        for arm in order:
            seeds = sorted(runs[arm])
            lines.append(f"| {arm} | {','.join(map(str, seeds))} | " + " | ".join(
                f"{mean([last_mean(runs[arm][s], k) for s in seeds]):.3g}" for k in probe_keys) + " |")
    gates = {name: gate_rates(steps) for arm in order for seed, steps in sorted(runs[arm].items())
             if (name := run_name(arm, seed)) and gate_rates(steps)}
    if gates:
        lines += ["", "Which bound would gate 5-30% of the valid responses (DSD > xi and A > 0), measured on each "
                  "run's own DSDs: mean share [min, max over steps], share of steps gating any", "",
                  "| run | " + " | ".join(GATE_RULES) + " |", "|" + "---|" * (len(GATE_RULES) + 1)]
        for name, rates in gates.items():
            lines.append(f"| {name} | " + " | ".join(f"{m:.3f} [{lo:.2f}, {hi:.2f}], {any_:.0%}"
                                                     for m, lo, hi, any_ in rates.values()) + " |")
    plot(runs, records, records / "relax_vs_grpo.png")
    return "\n".join(lines)


def plot(runs: dict[str, dict[int, list[dict]]], records: Path, path: Path) -> None:
    from matplotlib.figure import Figure

    panels = [("dsd", "DSD (authors' units, log scale)", True), ("entropy", "token entropy", False),
              ("reward", "training reward", False), ("length", "response length (tokens)", False),
              ("gated_frac", "gated fraction (DSD > xi, A > 0)", False),
              ("grad_share", "grad_share (|alpha L_xp| / |rest|)", True), ("alpha", "alpha", True),
              ("valid_frac", "responses with a defined DSD", False),
              ("probe_erank", "probe: effective rank of hidden states", False),
              ("probe_novelty", "probe: RepExp novelty within the group", False)]
    figure = Figure(figsize=(20, 11), dpi=100)
    axes = figure.subplots(3, 4)
    colors = dict(zip(ARMS, ["tab:blue", "tab:red", "tab:orange", "tab:brown", "tab:cyan", "tab:olive", "tab:green",
                             "tab:purple"]))
    for ax, (key, title, log) in zip(axes.flat, panels):
        for arm, seeds in runs.items():
            length = max(len(steps) for steps in seeds.values())
            xs, mid, low, high = [], [], [], []
            for i in range(length):
                values = [steps[i].get(key) for steps in seeds.values() if i < len(steps)]
                values = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
                if values:
                    xs.append(i + 1)
                    mid.append(statistics.fmean(values))
                    low.append(min(values))
                    high.append(max(values))
            if xs:
                color = colors.get(arm, "tab:gray")
                ax.plot(xs, mid, color=color, label=f"{arm} ({len(seeds)} seeds)")
                ax.fill_between(xs, low, high, color=color, alpha=0.15)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log and ax.lines:
            ax.set_yscale("log")
        if ax.lines:
            ax.legend(fontsize=7)
    for ax, metric in zip(axes[2, 2:], ("mean@1", "mean@k")):
        names, values, errors = [], [], []
        for arm, seeds in runs.items():
            per_seed = [e["figures"][metric]["value"] for s in seeds
                        if (e := read_evaluation(records, run_name(arm, s)))]
            if per_seed:
                names.append(f"{arm}\n({len(per_seed)})")
                values.append(statistics.fmean(per_seed))
                errors.append([[values[-1] - min(per_seed)], [max(per_seed) - values[-1]]])
        for i, (value, error) in enumerate(zip(values, errors)):
            ax.bar(i, value, yerr=error, capsize=4, color=colors.get(names[i].split("\n")[0], "tab:gray"))
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=30, ha="right")
        ax.set_title(f"held-out {metric} (mean over seeds, range)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)


# ------------------------------------------------------------------------------------------------ driver
def parse_run(text: str) -> tuple[str, int]:
    arm, _, seed = text.partition(":")
    if arm not in ARMS or not seed.isdigit():
        raise argparse.ArgumentTypeError(f"a run is ARM:SEED with ARM one of {list(ARMS)}, got {text!r}")
    return arm, int(seed)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/relax_small.yaml")
    parser.add_argument("--runs", nargs="+", type=parse_run, default=RUN_ORDER, help="ARM:SEED ... (default: all)")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps per run (trainer.max_steps)")
    parser.add_argument("--checkpoint_every", type=int, default=5, help="rollouts between checkpoints")
    parser.add_argument("--eval_prompts", type=int, default=128)
    parser.add_argument("--eval_samples", type=int, default=8)
    parser.add_argument("--records", default="docs/relax_vs_grpo", help="per-step records, evaluations, figure")
    parser.add_argument("--checkpoints", default="runs/relax_vs_grpo", help="each run's last.ckpt")
    parser.add_argument("--report", action="store_true", help="only the table and figure")
    parser.add_argument("--against", default="GRPO", choices=list(ARMS), help="the arm every other is paired with")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny random model (`python -m relax_pl.testing runs/tiny_qwen2`)")
    parser.add_argument("--phase", nargs=3, metavar=("PHASE", "ARM", "SEED"), help=argparse.SUPPRESS)  # a child
    args, overrides = parser.parse_known_args()
    args.overrides = [*overrides, *(["--model.pretrained=runs/tiny_qwen2"] if args.tiny else [])]
    records = Path(args.records)
    (records / "eval").mkdir(parents=True, exist_ok=True)
    if args.phase:
        train(args, args.phase[1], int(args.phase[2]))
        sys.exit(0)
    if not args.report:
        settings = ["--recipe", args.recipe, "--steps", str(args.steps), "--checkpoint_every",
                    str(args.checkpoint_every), "--records", args.records, "--checkpoints", args.checkpoints,
                    *args.overrides]
        for arm, seed in args.runs:
            name = run_name(arm, seed)
            if not read_run(records / f"{name}.jsonl")[2]:
                print(f"{name}: training {args.steps} steps", flush=True)
                child = subprocess.run([sys.executable, __file__, *settings, "--phase", "train", arm, str(seed)])
                if child.returncode or not read_run(records / f"{name}.jsonl")[2]:
                    print(f"{name}: training stopped (exit {child.returncode}); run the command again to resume",
                          flush=True)
                    continue
            if read_evaluation(records, name) is None:
                print(f"{name}: evaluating on {args.eval_prompts} held-out prompts", flush=True)
                if evaluate(args, arm, seed):
                    print(f"{name}: evaluation failed; run the command again to retry", flush=True)
            else:
                print(f"{name}: complete, kept", flush=True)
    print(report(records, args.against))
