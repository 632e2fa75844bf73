"""Step time of LoRA against full fine-tuning, side by side: one optimiser step of each in turn.

    python benchmarks/lora_vs_full.py --steps 6          # recipes/quickstart.yaml vs recipes/quickstart_lora.yaml
    python benchmarks/lora_vs_full.py --fast --steps 3   # a tiny random Qwen2 instead (seconds; checks the harness)

Each side is built from its recipe (``--full`` and ``--lora``; the quickstart pair differs only in ``model.setup``
and the learning rate an adapter needs), with the same prompts in the same order (shuffling off) and the same
seed. Each runs in its own process with the same thread count; the parent releases one optimiser step at a time,
rotating the order every step, so both see the same machine load (the gate of ``benchmarks/vs_trl.py``). A step
runs from its start to the next step's start; the first step is shown apart, the medians are over the others, and
the peak resident memory is measured from the first step on (model loading excluded).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
from pathlib import Path

import torch

from relax_pl.cli import main
from vs_trl import Worker, alternate, recipe_args, run_relax, summary, table

SIDES = {"full": "full fine-tuning", "lora": "LoRA"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", default="recipes/quickstart.yaml", help="the full fine-tuning recipe")
    parser.add_argument("--lora", default="recipes/quickstart_lora.yaml", help="the LoRA recipe")
    parser.add_argument("--steps", type=int, default=6, help="optimiser steps per side (the first is shown apart)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--fast", action="store_true", help="a tiny random Qwen2 instead of the recipes' model")
    return parser.parse_args()


def run(args: argparse.Namespace) -> None:
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2: the first step is shown apart from the medians")
    with tempfile.TemporaryDirectory() as tmp:
        pretrained = None
        if args.fast:
            from relax_pl.testing import save_tiny_model

            pretrained = str(save_tiny_model(Path(tmp) / "tiny"))
        cli = main(recipe_args(args.full, pretrained, args.steps, tmp, []), run=False)  # builds no model
        responses = cli.datamodule.batch_size * cli.model.sampling.num_responses
        workers = []
        for name, config in (("full", args.full), ("lora", args.lora)):
            cli_args = recipe_args(config, pretrained, args.steps, str(Path(tmp) / name), [])
            parent_conn, child_conn = mp.Pipe()
            process = mp.Process(target=run_relax, args=(child_conn, cli_args, args.threads), name=name)
            process.start()
            child_conn.close()
            workers.append(Worker(name, process, parent_conn, []))
        try:
            alternate(workers, args.steps)
        finally:
            for worker in workers:
                if worker.process.is_alive():
                    worker.process.kill()
        results = {w.name: summary(w.steps) for w in workers}
    print(f"\nLoRA ({args.lora}) vs full fine-tuning ({args.full}){', --fast' if args.fast else ''}; "
          f"{args.threads} threads; {args.steps} optimiser steps each (first shown apart)\n")
    print(table(results, responses, SIDES, ratio=("lora", "full"), first_column="setup"))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    run(parse_args())
