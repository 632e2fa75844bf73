"""Does a change leave training alone? Fit a recipe for a few steps from a fixed seed in two checkouts and compare.

    OMP_NUM_THREADS=1 python benchmarks/same_weights.py save /tmp/before.pt      # in the checkout before the change
    OMP_NUM_THREADS=1 python benchmarks/same_weights.py save /tmp/after.pt       # in the checkout after it
    python benchmarks/same_weights.py diff /tmp/before.pt /tmp/after.pt

``save`` runs ``--config`` (default recipes/quickstart.yaml) for ``--steps`` optimiser steps (default 3) without
validation, checkpoints or logger, and saves the policy's weights; ``diff`` prints the largest difference, whether
they are bitwise equal, and how far the weights moved from the recipe's model. Use one thread: with two, two runs of
the same code on this project's CPU differ by up to 7e-5 after 3 quickstart steps.
"""

from __future__ import annotations

import argparse

import torch


def save(config: str, steps: int, out: str) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from relax_pl.cli import main

    cli = main(["--config", config, f"--trainer.max_steps={steps}", "--trainer.logger=false",
                f"--trainer.default_root_dir={out}.root", "--trainer.limit_val_batches=0"], run=False)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    cli.trainer.fit(cli.model, cli.datamodule)
    torch.save({"pretrained": cli.model.pretrained,
                "weights": {k: v.detach().clone() for k, v in cli.model.policy.state_dict().items()}}, out)


def diff(a_path: str, b_path: str) -> None:
    from relax_pl.models import load_causal_lm

    a, b = torch.load(a_path), torch.load(b_path)
    wa, wb = a["weights"], b["weights"]
    largest = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
    start = load_causal_lm(a["pretrained"]).state_dict()
    moved = max(float((wa[k].float() - start[k].float()).abs().max()) for k in wa if k in start)
    print(f"{len(wa)} tensors; max |a - b| {largest:.3g}; bitwise equal {all(torch.equal(wa[k], wb[k]) for k in wa)}; "
          f"a moved from {a['pretrained']} by up to {moved:.3g}")


if __name__ == "__main__":  # reward workers import this script again
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["save", "diff"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.command == "save":
        save(args.config, args.steps, args.paths[0])
    else:
        diff(*args.paths)
