"""Every available rollout engine side by side on one recipe (default: the quickstart), one process each.

    .venv-vllm/bin/python benchmarks/rollout_backends.py --steps 6   # all engines (vLLM lives in .venv-vllm)
    python benchmarks/rollout_backends.py --steps 6                  # the engines of this environment
    python benchmarks/rollout_backends.py --fast                      # a tiny random Llama, 2 steps: checks the script

Each engine trains the same recipe for ``--steps`` optimiser steps in its own process (the same seed, so the same
prompts), with ``--threads`` torch threads, one after the other. Reported: the median over steps 2.. of the
generation time (``timing_s/gen``: for VLLM it includes the weight sync before the rollout), the generated tokens
per second, the update and the whole step; the first step apart (it pays the one-off costs); the process's peak
resident memory (the policy, the optimiser and, for VLLM, the engine with its key/value cache); and for an engine
with weights of its own the mean |log-prob gap| between engine and policy (``rollout/logp_abs_diff``). Run it on an
otherwise idle machine: every number moves with the load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

ENGINES: dict[str, dict[str, Any]] = {
    "HFGenerate (dynamic cache)": {"class_path": "relax_pl.rollout.HFGenerate", "init_args": {"cache": "dynamic"}},
    "HFGenerate (static cache)": {"class_path": "relax_pl.rollout.HFGenerate", "init_args": {"cache": "static"}},
    "HFContinuousBatching": {"class_path": "relax_pl.rollout.HFContinuousBatching"},
    "VLLM": {"class_path": "relax_pl.rollout.VLLM"},
}


class StepRecorder(L.Callback):
    """Each step's logged metrics, and the seconds from ``begin`` to the first step (imports, loading, engine)."""

    def __init__(self, begin: float) -> None:
        self.begin = begin
        self.start_s = float("nan")
        self.steps: list[dict[str, float]] = []

    def on_train_start(self, *args) -> None:
        self.start_s = time.perf_counter() - self.begin

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def run_engine(conn, cli_args: list[str], threads: int) -> None:
    """In a fresh process: fit with the given arguments, send back the per-step metrics and the peak RSS."""
    begin = time.perf_counter()
    torch.set_num_threads(threads)  # before vLLM starts: its CPU worker then pins the thread count
    from relax_pl.cli import main

    try:
        cli = main(cli_args, run=False)
        recorder = StepRecorder(begin)
        cli.trainer.callbacks.append(recorder)
        cli.trainer.fit(cli.model, cli.datamodule)
        conn.send({
            "steps": recorder.steps,
            "start_s": recorder.start_s,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        })
    except Exception as error:  # the table says which engine failed and why; the others still run
        conn.send({"error": f"{type(error).__name__}: {error}"[:300]})


def measure(name: str, cli_args: list[str], threads: int) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=run_engine, args=(child, cli_args, threads))
    process.start()
    result = parent.recv() if parent.poll(timeout=None) else {"error": "no result"}
    process.join()
    print(f"{name}: done", flush=True)
    return result


def summary(result: dict[str, Any]) -> list[str]:
    if "error" in result:
        return [f"failed: {result['error']}"] + [""] * 7
    steps = result["steps"]
    rest = steps[1:] or steps
    median = lambda key: statistics.median(s.get(key, float("nan")) for s in rest)  # noqa: E731
    gap = median("rollout/logp_abs_diff") if "rollout/logp_abs_diff" in rest[0] else None
    return [
        f"{steps[0]['timing_s/step']:.1f}",
        f"{median('timing_s/step'):.2f}",
        f"{median('timing_s/gen'):.2f}",
        f"{median('perf/gen_tokens_per_s'):.0f}",
        f"{median('timing_s/update'):.2f}",
        f"{result['peak_rss_gb']:.2f}",
        f"{result['start_s']:.0f}",
        "" if gap is None else f"{gap:.1e}",
    ]


def recipe_args(config: str, steps: int, out: str, engine: dict[str, Any], fast_model: str | None) -> list[str]:
    args = [
        "--config", config, f"--trainer.max_steps={steps}", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}", "--trainer.callbacks=[]", f"--model.rollout={json.dumps(engine)}",
    ]
    if fast_model is not None:
        args += [f"--model.pretrained={fast_model}", "--model.sampling.max_new_tokens=8"]
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per engine (the first is shown apart)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--engines", nargs="*", default=list(ENGINES), help=f"a subset of {list(ENGINES)}")
    parser.add_argument("--fast", action="store_true", help="a tiny random Llama, 2 steps of 8 tokens")
    args = parser.parse_args()
    steps = 2 if args.fast else args.steps
    with tempfile.TemporaryDirectory() as out:
        fast_model = None
        if args.fast:  # heads 32 wide: vLLM's CPU attention takes nothing narrower
            from relax_pl.testing import save_tiny_model

            fast_model = str(save_tiny_model(Path(out) / "tiny", kind="llama", hidden_size=64, heads=2, kv_heads=1))
        rows = {}
        for name in args.engines:
            if name == "VLLM" and importlib.util.find_spec("vllm") is None:
                missing = "not installed here (bash scripts/bootstrap_vllm.sh, then run with .venv-vllm/bin/python)"
                rows[name] = [missing] + [""] * 7
                continue
            result = measure(name, recipe_args(args.config, steps, out, ENGINES[name], fast_model), args.threads)
            rows[name] = summary(result)
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if importlib.util.find_spec("vllm") is not None:
        import vllm

        versions += f", vllm {vllm.__version__}"
    model = " with a tiny random Llama (--fast)" if args.fast else ""
    print(f"\n{args.config}{model}: {steps} optimiser steps per engine, "
          f"{args.threads} threads; medians over steps 2..{steps}; {versions}\n")
    columns = ["engine", "first step (s)", "step (s)", "generation (s)", "gen tokens/s", "update (s)", "peak RSS (GB)",
               "start-up (s)", "engine-policy log-prob gap"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
