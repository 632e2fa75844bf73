"""``python -m relax_pl evaluate``: sample a recipe's validation prompts with one or more checkpoints and report
figures that can tell two runs apart.

    python -m relax_pl evaluate --config recipes/relax_small.yaml --ckpt_path A.ckpt --ckpt_path B.ckpt
    python -m relax_pl evaluate --config recipes/relax_small.yaml            # the base model (no checkpoint)
    python -m relax_pl evaluate --config recipes/relax_small.yaml --ckpt_path base --ckpt_path A.ckpt   # A vs base

For each checkpoint (in the order given), over the recipe's validation source (``data.val_source`` /
``val_split``, at most ``--max_prompts`` prompts): one greedy answer and ``--num_samples`` (n, default 16) answers at
the recipe's sampling temperature per prompt, scored by the recipe's reward through the bounded scorer. It reports

* ``mean@1``: the greedy answer's accuracy (the paper's mean@1);
* ``mean@k`` for k = 2, 4, ... n: the mean accuracy of the first k samples (the paper's mean@32 at T = 1 is k = 32;
  its expectation is the same for every k, its interval narrows as k grows); ``mean@k`` without a number is k = n;
* ``pass@k`` for k = 1, 2, 4, ... n: the unbiased estimator ``1 - C(n - c, k) / C(n, k)`` from all n samples
  (:func:`pass_at_k`); pass@1 is the accuracy over all n samples;

each with a 95% interval from a bootstrap over prompts, and for every checkpoint after the first its paired
difference to the first on the same prompts (a bootstrap over the per-prompt differences). It writes
``<out>/evaluation.json`` (every figure, the per-prompt values, the settings, each checkpoint's path and step) and
``<out>/evaluation.png`` (pass@k and mean@k against k, intervals shaded), and prints a table.

Sampling runs as a Lightning ``predict`` over the prompts with the recipe's setup and rollout engine, so several
devices each sample their share of the prompts and the results are gathered; every checkpoint starts from the same
``--seed``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader, DistributedSampler

from relax_pl.checkpointing import CheckpointError, load_checkpoint_file

CONFIDENCE = 0.95


# ------------------------------------------------------------------------------------------------ estimators
def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k from ``c`` correct of ``n`` samples: ``1 - C(n - c, k) / C(n, k)`` (Chen et al. 2021,
    arXiv 2107.03374, Eq. 1), as the exact ratio of Python integers rounded once: no overflow for any n."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    ks = [2**i for i in range(n.bit_length()) if 2**i <= n]
    return ks if ks[-1] == n else [*ks, n]


def bootstrap_interval(values: Sequence[float], draws: int = 2000, seed: int = 0,
                       confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the mean of ``values`` under resampling them with replacement."""
    values = list(values)
    if not values:
        return math.nan, math.nan
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(draws))
    tail = (1 - confidence) / 2
    return means[int(tail * draws)], means[min(draws - 1, int((1 - tail) * draws))]


def figure(values: Sequence[float], draws: int, seed: int) -> dict[str, float]:
    low, high = bootstrap_interval(values, draws, seed)
    return {"value": statistics.fmean(values) if values else math.nan, "low": low, "high": high}


@dataclass
class PromptResult:
    """One prompt under one checkpoint: which of its n samples were right, in order, and its greedy answer."""

    row: int
    source: str
    samples: list[float]  # correctness of each sample, in [0, 1]
    greedy: float
    scored_by: str = "accuracy"  # or the overall reward, for a reward that reports no accuracy

    def per_prompt(self, ks: list[int]) -> dict[str, float]:
        n, c = len(self.samples), sum(s >= 0.5 for s in self.samples)
        values = {"mean@1": self.greedy}
        for k in ks:
            if k > 1:  # a sampled mean@1 would clash with the greedy one; pass@1 is the sampled accuracy
                values[f"mean@{k}"] = statistics.fmean(self.samples[:k])
            values[f"pass@{k}"] = pass_at_k(n, c, k)
        return values


def summarise(results: list[PromptResult], draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Every figure of one checkpoint with its interval, the per-prompt values behind them, and the same per data
    source. ``mean@k`` and ``pass@k`` (no number) are those of k = n."""
    n = len(results[0].samples)
    ks = powers_of_two(n)
    per_prompt: dict[str, list[float]] = {}
    for result in results:
        for name, value in result.per_prompt(ks).items():
            per_prompt.setdefault(name, []).append(value)
    per_prompt["mean@k"], per_prompt["pass@k"] = per_prompt[f"mean@{n}" if n > 1 else "pass@1"], per_prompt[f"pass@{n}"]
    figures = {name: figure(values, draws, seed) for name, values in per_prompt.items()}
    by_source = {}
    for source in sorted({r.source for r in results}):
        picked = [i for i, r in enumerate(results) if r.source == source]
        by_source[source] = {name: figure([per_prompt[name][i] for i in picked], draws, seed)
                             for name in ("mean@1", "mean@k", "pass@k")}
    return {"figures": figures, "by_source": by_source, "per_prompt": per_prompt,
            "rows": [r.row for r in results], "ks": ks}


def paired(first: dict[str, Any], other: dict[str, Any], draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """``other - first`` on the same prompts, for every figure, with a bootstrap interval over prompts."""
    if first["rows"] != other["rows"]:
        raise ValueError("paired differences need the same prompts in the same order")
    return {name: figure([b - a for a, b in zip(first["per_prompt"][name], values)], draws, seed)
            for name, values in other["per_prompt"].items()}


# ------------------------------------------------------------------------------------------------ sampling
def score_prompts(module: Any, batch: list[dict[str, Any]], num_samples: int) -> list[PromptResult]:
    """Sample ``num_samples`` answers at the recipe's sampling settings and one greedy answer for each prompt of
    ``batch`` with ``module`` (an :class:`~relax_pl.module.RLVRModule`), scored by their accuracy, or by the overall
    reward for a reward that reports none (``evaluation.json`` says which: ``settings.scored_by``)."""
    from dataclasses import replace

    from relax_pl.metrics import correctness_or_overall

    sampling = replace(module.sampling, num_responses=num_samples,
                       max_new_tokens=module.validation.max_new_tokens or module.sampling.max_new_tokens)
    components = module.compute_rewards(module.generate(batch, sampling))
    sampled = correctness_or_overall(components).view(len(batch), num_samples)
    greedy_rollout = module.generate(batch, replace(sampling, num_responses=1), greedy=True)
    greedy = correctness_or_overall(module.compute_rewards(greedy_rollout))
    return [PromptResult(int(sample["row"]), str(sample.get("data_source") or sample["source"]),
                         sampled[i].tolist(), float(greedy[i]), scored_by(components))
            for i, sample in enumerate(batch)]


def scored_by(components: dict[str, torch.Tensor]) -> str:
    from relax_pl.metrics import correctness

    return "overall reward (no reward reports an accuracy)" if correctness(components) is None else "accuracy"


def gather(results: list[PromptResult]) -> list[PromptResult]:
    """Every rank's results, each prompt once, in row order (a distributed sampler may repeat rows)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        everyone: list[list[PromptResult] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, results)
        results = [r for part in everyone for r in part]
    return list({r.row: r for r in sorted(results, key=lambda r: r.row)}.values())


def checkpoint_step(path: str | None) -> int | None:
    """The optimiser step a checkpoint was written at (None for the base model)."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint keeps its plain entries in meta.pt
        return torch.load(path / "meta.pt", map_location="cpu", weights_only=True).get("global_step")
    return load_checkpoint_file(path, mmap=True).get("global_step")


def evaluate(config: str, checkpoints: list[str | None], num_samples: int = 16, max_prompts: int | None = None,
             seed: int = 0, out: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Sample and score the recipe's validation prompts with each checkpoint (None: the base model); write
    ``evaluation.json`` and ``evaluation.png`` into ``out`` (default ``<trainer.default_root_dir>/evaluation``) on
    the first rank and return what the json holds."""
    import lightning as L

    from relax_pl.cli import main
    from relax_pl.extension import RLVRCallback

    if num_samples < 1:
        raise ValueError(f"--num_samples must be >= 1, got {num_samples}")
    for path in checkpoints:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"checkpoint {path!r} (--ckpt_path) does not exist")
    limit = [f"--data.max_val_samples={max_prompts}"] if max_prompts else []
    # RLVRModule.predict_step samples model.validation.num_responses answers per prompt
    settings = ["--trainer.logger=false", f"--model.validation.num_responses={num_samples}", *limit]
    cli = main(["--config", config, *settings, *overrides], run=False)
    trainer, module, data = cli.trainer, cli.model, cli.datamodule
    if data.val_source is None:
        raise ValueError(f"{config}: data.val_source is not set; evaluate samples the recipe's validation prompts")
    # no training: no loss terms, no checkpoints
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (RLVRCallback, L.pytorch.callbacks.Checkpoint))]
    data.setup("validate")
    prompts = data.val_dataloader()
    if trainer.world_size > 1:
        # Every rank runs as many batches (Lightning's predict sampler would not repeat rows, and sharded forwards
        # must run in lockstep); gather() drops the repeated rows.
        sampler = DistributedSampler(prompts.dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        prompts = DataLoader(prompts.dataset, batch_size=prompts.batch_size, sampler=sampler, collate_fn=list)
    out = Path(out) if out is not None else Path(trainer.default_root_dir) / "evaluation"
    by_position: dict[int, dict[str, Any]] = {}
    # the base model first, wherever it is named: the policy holds the recipe's weights only until a checkpoint
    # is loaded into it (each evaluation reseeds, so the order changes no figure)
    for index in sorted(range(len(checkpoints)), key=lambda i: checkpoints[i] is not None):
        path = checkpoints[index]
        L.seed_everything(seed, verbose=False)
        with warnings.catch_warnings():  # the run's ModelCheckpoint is not needed to read its checkpoint
            warnings.filterwarnings("ignore", "Be aware that when using `ckpt_path`")
            batches = trainer.predict(module, dataloaders=prompts, ckpt_path=path)
        results = gather([r for batch in batches for r in batch])
        by_position[index] = {"path": path, "step": checkpoint_step(path), **summarise(results, seed=seed)}
    evaluated = [by_position[index] for index in range(len(checkpoints))]
    report = {
        "settings": {
            "config": str(config), "overrides": list(overrides), "val_source": data.val_source,
            "val_split": data.val_split, "prompts": len(evaluated[0]["rows"]), "num_samples": num_samples,
            "temperature": module.sampling.temperature, "top_p": module.sampling.top_p, "top_k": module.sampling.top_k,
            "max_new_tokens": module.validation.max_new_tokens or module.sampling.max_new_tokens,
            "engine": type(module.rollout_engine).__name__, "devices": trainer.world_size, "seed": seed,
            "scored_by": results[0].scored_by,
            "confidence": CONFIDENCE, "bootstrap": "percentile, 2000 draws over prompts",
        },
        "checkpoints": evaluated,
        "paired": [{"first": evaluated[0]["path"], "other": e["path"], "figures": paired(evaluated[0], e, seed=seed)}
                   for e in evaluated[1:]],
    }
    if trainer.is_global_zero:
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report, indent=1))
        plot(report, out / "evaluation.png")
        print(table(report))
        print(f"\nwritten: {out / 'evaluation.json'}, {out / 'evaluation.png'}")
    return report


# ------------------------------------------------------------------------------------------------ output
def label(entry: dict[str, Any]) -> str:
    return "base model" if entry["path"] is None else f"{entry['path']} (step {entry['step']})"


def table(report: dict[str, Any]) -> str:
    """Figures per checkpoint, side by side, with the paired difference of each later checkpoint to the first."""
    entries = report["checkpoints"]
    ks = entries[0]["ks"]
    names = ["mean@1", *(f"mean@{k}" for k in ks if k > 1), *(f"pass@{k}" for k in ks)]
    header = ["", *(f"[{i}]" for i in range(len(entries))), *(f"[{i}] - [0]" for i in range(1, len(entries)))]
    lines = [f"{s['prompts']} prompts of {s['val_source']} ({s['val_split']}), {s['num_samples']} samples at T = "
             f"{s['temperature']} and one greedy answer each; [low, high]: {round(100 * s['confidence'])}% bootstrap "
             "interval over prompts" for s in [report["settings"]]]
    lines += [f"[{i}] {label(e)}" for i, e in enumerate(entries)]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def cell(f: dict[str, float], sign: str = "") -> str:
        return f"{f['value']:{sign}.3f} [{f['low']:{sign}.3f}, {f['high']:{sign}.3f}]"

    for name in names:
        cells = [cell(e["figures"][name]) for e in entries] + [cell(p["figures"][name], "+") for p in report["paired"]]
        lines.append(f"| {name}{' (greedy)' if name == 'mean@1' else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2), dpi=100)
    for ax, kind in zip(figure.subplots(1, 2), ("pass", "mean")):
        for i, entry in enumerate(report["checkpoints"]):
            ks = [k for k in entry["ks"] if kind == "pass" or k > 1]
            values = [entry["figures"][f"{kind}@{k}"] for k in ks]
            line, = ax.plot(ks, [v["value"] for v in values], marker="o", label=f"[{i}] {label(entry)}"[:70])
            ax.fill_between(ks, [v["low"] for v in values], [v["high"] for v in values], color=line.get_color(),
                            alpha=0.2)
            if kind == "mean":
                ax.axhline(entry["figures"]["mean@1"]["value"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k")
        ax.set_title(f"{kind}@k (95% interval shaded)" + ("; dotted: greedy mean@1" if kind == "mean" else ""),
                     fontsize=10)
        ax.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


def main(args: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m relax_pl evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the recipe: model, sampling, reward and validation source")
    parser.add_argument("--ckpt_path", action="append", default=[],
                        help="a checkpoint (.ckpt file or sharded folder), or 'base' for the recipe's model as it is; "
                             "repeat to compare (the first is the reference of the paired differences); default: base")
    parser.add_argument("--num_samples", type=int, default=16, help="samples per prompt at the recipe's temperature")
    parser.add_argument("--max_prompts", type=int, help="the first N prompts of the validation source")
    parser.add_argument("--seed", type=int, default=0, help="every checkpoint samples from this seed")
    parser.add_argument("--out", help="folder for evaluation.json and evaluation.png")
    parsed, overrides = parser.parse_known_args(args)
    try:
        checkpoints = [None if path == "base" else path for path in parsed.ckpt_path] or [None]
        return evaluate(parsed.config, checkpoints, parsed.num_samples, parsed.max_prompts,
                        parsed.seed, parsed.out, overrides)
    except (CheckpointError, FileNotFoundError, ValueError) as error:  # the message names what is wrong
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main(sys.argv[1:])
