"""Cost per step of each latent method and of the latent probes, against the RL step time.

    python benchmarks/latent_overhead.py                                # relax_small's task and model, 8 steps
    python benchmarks/latent_overhead.py --arms grpo,probes --max-responses 64
    python benchmarks/latent_overhead.py --set trainer.accelerator=gpu --set model.sampling.max_new_tokens=512

Runs ``recipes/relax_small.yaml`` (``--recipe``) as plain GRPO with its latent callbacks removed, then once per arm
from the same seed with that arm's callbacks added back:

* ``probes``: KoopmanFit (no loss term) and SpectrumMonitor computing its probes every step on ``--max-responses``
  responses, images every ``--image-every`` steps, read in a no-grad forward before the update (``read_from:
  rollout``);
* ``probes_update``: the same probes read from the update's own forward (``read_from: update``, which the default
  ``auto`` picks in relax_small);
* ``relax``: KoopmanFit and LatentExploration as recipes/relax_small.yaml sets them;
* ``relax_target``: the same with the paired experiment's ReLaX-target settings (``grad_share_target`` 0.1, a
  quantile bound), whose DSDs measured ahead of the update come from the shared no-grad forward;
* ``repexp``: RepExp as recipes/repexp_small.yaml sets it;
* ``er``: EffectiveRankShaping as recipes/effective_rank_small.yaml sets it.

Reported per arm, over the steps after the first (which holds one-off costs: the dictionary fit, the reward
workers' start): the mean ``timing_s/step``; the method's own phases, ``timing_s/hidden`` (the shared no-grad
forward and what callbacks compute on it), ``timing_s/ref`` (RepExp's pre-trained features, ReLaX's gated KL),
``timing_s/dsd`` (ReLaX's DSD forward; its backward is inside ``timing_s/update``) and ``timing_s/probes``; and
their sum as a share of the step. The share is the number to quote: differences between two runs' step times also
hold their responses' different lengths (a method changes the policy, so from step 2 on the arms sample different
responses). Step 1 is the exception: every arm samples the same responses from the same weights (``len@1``, the
mean response length, shows it), so ``update@1`` (``timing_s/update`` of step 1) against GRPO's is what a loss
term adds to the update, its backward included (ReLaX's DSD forward and backward). Run it on a quiet machine; each
run's log is under ``--out``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from relax_vs_grpo import ARMS as EXPERIMENT_ARMS  # benchmarks/ is on sys.path when this script runs

LATENT = frozenset({"KoopmanFit", "LatentExploration", "RepExp", "EffectiveRankShaping", "SpectrumMonitor"})
OWN_PHASES = ["hidden", "ref", "dsd", "probes"]
# arm -> (the recipe its callbacks come from, the callback classes taken from it)
ARMS = {
    "relax": ("recipes/relax_small.yaml", {"KoopmanFit", "LatentExploration"}),
    "repexp": ("recipes/repexp_small.yaml", {"RepExp"}),
    "er": ("recipes/effective_rank_small.yaml", {"EffectiveRankShaping"}),
}


def scalars(folder: Path) -> dict[str, list[float]]:
    """TensorBoard scalars (tag -> values in step order) under ``folder``."""
    out: dict[str, list[float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in accumulator.Scalars(tag))
    return out


def name_of(callback: dict) -> str:
    return callback["class_path"].rsplit(".", 1)[-1]


def callbacks_of(recipe: str, names: set[str]) -> list[dict]:
    found = [cb for cb in yaml.safe_load(Path(recipe).read_text())["trainer"]["callbacks"] if name_of(cb) in names]
    if {name_of(cb) for cb in found} != names:
        raise ValueError(f"{recipe} does not configure all of {sorted(names)}")
    return found


def set_key(recipe: dict, dotted: str, value: str) -> None:
    *path, last = dotted.split(".")
    node = recipe
    for key in path:
        node = node.setdefault(key, {})
    node[last] = yaml.safe_load(value)


def write_run(
    recipe: dict, folder: Path, added: list[dict], steps: int, dropped: frozenset[str] = LATENT | {"ModelCheckpoint"}
) -> Path:
    """``recipe`` for ``steps`` optimiser steps without the callbacks named in ``dropped`` (by default its latent
    callbacks and checkpoints), plus ``added``, logging every step to ``folder``, without validation."""
    run = yaml.safe_load(yaml.safe_dump(recipe))
    trainer = run.setdefault("trainer", {})
    kept = [cb for cb in trainer.get("callbacks", []) if name_of(cb) not in dropped]
    trainer.update(
        callbacks=kept + added, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        default_root_dir=str(folder), enable_checkpointing=False,
        logger={"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder), "name": "tb"}},
    )
    trainer.pop("val_check_interval", None)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(run, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/relax_small.yaml", help="the task, model and update of every arm")
    parser.add_argument("--arms", default="grpo,probes,probes_update,relax,relax_target,repexp,er")
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run (the first is not counted)")
    parser.add_argument("--max-responses", type=int, default=24, help="responses the probes read each step")
    parser.add_argument("--image-every", type=int, default=4, help="spectrum images every this many steps")
    parser.add_argument("--m", type=int, default=16, help="the probes' KoopmanFit m (relax_small's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of every run's recipe, e.g. model.pretrained=/path (repeatable)")
    parser.add_argument("--out", default="runs/latent_overhead")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step is not counted")
    arms = args.arms.split(",")
    known = ["grpo", "probes", "probes_update", "relax_target", *ARMS]
    if set(arms) - set(known):
        parser.error(f"unknown arms {sorted(set(arms) - set(known))}; choose from {', '.join(known)}")

    recipe = yaml.safe_load(Path(args.recipe).read_text())
    for item in args.set:
        key, _, value = item.partition("=")
        set_key(recipe, key, value)
    probes = [
        {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": args.m}},
        {"class_path": "relax_pl.callbacks.SpectrumMonitor",
         "init_args": {"every_n_steps": args.image_every, "max_responses": args.max_responses,
                       "n_min": args.m + 1, "metrics_every_n_steps": 1, "read_from": "rollout"}},
    ]
    probes_from_update = [probes[0], {**probes[1], "init_args": {**probes[1]["init_args"], "read_from": "update"}}]
    fit, explore = callbacks_of(*ARMS["relax"])
    relax_target = [fit, {**explore, "init_args": {**explore["init_args"], **EXPERIMENT_ARMS["ReLaX-target"].explore}}]
    callbacks_of_arm = {"grpo": [], "probes": probes, "probes_update": probes_from_update, "relax_target": relax_target}
    print(f"recipe {args.recipe}, {args.steps} steps (step 1 not counted)")
    print(f"{'arm':<14}{'step s':>9}" + "".join(f"{p + ' s':>10}" for p in OWN_PHASES) + f"{'own share':>11}"
          + f"{'update@1 s':>12}{'len@1':>8}")
    for arm in arms:
        added = callbacks_of_arm[arm] if arm in callbacks_of_arm else callbacks_of(*ARMS[arm])
        folder = Path(args.out) / arm
        config = write_run(recipe, folder, added, args.steps)
        with open(folder / "log.txt", "w") as log:
            subprocess.run([sys.executable, "-m", "relax_pl", "fit", "--config", str(config)], check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        logged = scalars(folder)
        mean = lambda tag: statistics.fmean(logged[tag][1:]) if len(logged.get(tag, [])) > 1 else 0.0  # noqa: E731
        own = {phase: mean(f"timing_s/{phase}") for phase in OWN_PHASES}
        step = mean("timing_s/step")
        print(f"{arm:<14}{step:>9.3f}" + "".join(f"{own[p]:>10.3f}" for p in OWN_PHASES)
              + f"{sum(own.values()) / step:>11.1%}"
              + f"{logged['timing_s/update'][0]:>12.3f}{logged['response_length/mean'][0]:>8.1f}")


if __name__ == "__main__":
    main()
