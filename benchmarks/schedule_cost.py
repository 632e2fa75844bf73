"""What the paper's schedule costs against relax_small's, and whether PPO's clip and clip-higher act in it.

    python benchmarks/schedule_cost.py                       # 3 rollouts of each recipe, the first not counted
    python benchmarks/schedule_cost.py --rollouts 5 --set model.pretrained=runs/tiny_qwen2

relax_small takes one optimiser step per rollout (3 prompts x 8 responses, one mini-batch): every update is on-policy,
so the PPO ratio is 1 and neither clip can act. recipes/relax_small_paper_schedule.yaml feeds each rollout (8 prompts
x 8) to 4 optimiser steps of 16 responses, as the paper's 512 prompts feed 16 mini-batches of 32: from the second
mini-batch on the policy has moved, the ratio leaves 1 and the clips act. Both recipes run as they are (ReLaX
included) from the same seed, one after the other, for ``--rollouts`` rollouts each, with TensorBoard logging to
``--out`` and no checkpoints or validation. Reported per recipe over the rollouts after the first (which holds the
dictionary fit and the reward workers' start): seconds per rollout, per optimiser step and per response, the update's
share of the rollout, and the clip fractions and PPO KL of the update. Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import yaml
from latent_overhead import scalars, set_key, write_run

RECIPES = {"relax_small": "recipes/relax_small.yaml", "paper_schedule": "recipes/relax_small_paper_schedule.yaml"}


def optimiser_steps_per_rollout(recipe: dict) -> int:
    responses = recipe["data"]["batch_size"] * recipe["model"]["sampling"]["num_responses"]
    update = recipe["model"].get("update", {})
    mini_batch = update.get("mini_batch_size") or responses
    return update.get("ppo_epochs", 1) * -(-responses // mini_batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=3, help="rollouts per recipe (the first is not counted)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of both recipes, e.g. model.pretrained=/path (repeatable)")
    parser.add_argument("--out", default="runs/schedule_cost")
    args = parser.parse_args()
    if args.rollouts < 2:
        parser.error("--rollouts must be at least 2: the first rollout is not counted")

    columns = ["opt steps/rollout", "responses/rollout", "s/rollout", "s/opt step", "s/response", "update share",
               "pg_clipfrac", "clipfrac_low", "clipfrac_high", "ppo_kl"]
    rows = {}
    for name, path in RECIPES.items():
        recipe = yaml.safe_load(Path(path).read_text())
        for item in args.set:
            key, _, value = item.partition("=")
            set_key(recipe, key, value)
        folder = Path(args.out) / name
        # the recipe as it is (ReLaX included), without its checkpoints
        per_rollout = optimiser_steps_per_rollout(recipe)
        config = write_run(recipe, folder, [], args.rollouts * per_rollout, dropped=frozenset({"ModelCheckpoint"}))
        with open(folder / "log.txt", "w") as log:
            subprocess.run([sys.executable, "-m", "relax_pl", "fit", "--config", str(config)], check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        logged = scalars(folder)
        counted = lambda tag: logged.get(tag, [])[1:]  # noqa: E731
        mean = lambda tag: statistics.fmean(counted(tag)) if counted(tag) else float("nan")  # noqa: E731
        responses = recipe["data"]["batch_size"] * recipe["model"]["sampling"]["num_responses"]
        rollout_s = mean("timing_s/step")
        rows[name] = [per_rollout, responses, rollout_s, rollout_s / per_rollout, rollout_s / responses,
                      mean("timing_s/update") / rollout_s, mean("actor/pg_clipfrac"), mean("actor/pg_clipfrac_low"),
                      mean("actor/pg_clipfrac_high"), mean("actor/ppo_kl")]

    print(f"{args.rollouts} rollouts per recipe, the first not counted; one after the other, same seed")
    print("| recipe | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3g}" for v in values) + " |")
    small, paper = rows["relax_small"], rows["paper_schedule"]
    print(f"paper schedule / relax_small: {paper[2] / small[2]:.2f}x per rollout, {paper[3] / small[3]:.2f}x per "
          f"optimiser step, {paper[4] / small[4]:.2f}x per response")


if __name__ == "__main__":
    main()
