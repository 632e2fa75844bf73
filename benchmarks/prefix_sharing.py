"""What encoding each prompt once for all its responses saves, in generation and in the update's forward+backward.

    python benchmarks/prefix_sharing.py                          # recipes/quickstart.yaml's model and first batch
    python benchmarks/prefix_sharing.py --config recipes/quickstart.yaml --repeats 5

Both variants run in this one process, alternating, on the same rollout and weights: "shared" is what relax_pl
does (the prompt's key/value cache computed once per group and repeated for its responses); "per response" runs
every response's prompt through the model again (generation: each copy of a prompt as a prompt of its own; update:
``ResponseForward.shares_prompt_prefix`` switched off). Medians over ``--repeats`` alternations.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from relax_pl.cli import main
from relax_pl.rollout import generate


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    cli = main(["--config", args.config, "--trainer.logger=false", "--data.shuffle=false"], run=False)
    module, data = cli.model, cli.datamodule
    module.configure_model()
    data.setup("fit")
    batch = [data.train_data[i] for i in range(data.batch_size)]
    prompts = [module.render_prompt(sample) for sample in batch]
    group = module.sampling.num_responses
    torch.manual_seed(0)
    rollout = module.generate(batch)
    lengths = rollout.response_mask.sum(-1).float()
    print(f"{args.config}: {len(batch)} prompts x {group} responses, prompt {rollout.prompt_length} tokens (padded), "
          f"responses {float(lengths.mean()):.1f} tokens on average, {torch.get_num_threads()} threads")

    def generation(shared: bool) -> None:
        if shared:
            generate(module.policy, module.tokenizer, prompts, batch, module.sampling)
        else:
            repeated = [p for p in prompts for _ in range(group)]
            generate(module.policy, module.tokenizer, repeated, [s for s in batch for _ in range(group)],
                     module.sampling, num_responses=1)

    def update(shared: bool) -> None:
        forward = module.response_forward  # shared: relax_pl's own decision
        if not shared:
            forward.shares_prompt_prefix = lambda *args: False
        for rows in torch.arange(len(rollout)).split(module.update.micro_batch_size):
            logp, _, mask, _, _ = forward(module.policy, rollout, rows)
            (logp * mask).sum().backward()
        module.policy.zero_grad(set_to_none=True)

    seconds = {(phase, shared): [] for phase in ("generation", "update") for shared in (True, False)}
    for _ in range(args.repeats):
        for shared in (True, False):
            torch.manual_seed(1)  # same draws: the same number of decoding steps on both sides, mostly
            seconds["generation", shared].append(timed(lambda: generation(shared)))
            seconds["update", shared].append(timed(lambda: update(shared)))
    print("\n| phase | shared prefix (s) | per response (s) | shared / per response |\n|---|---|---|---|")
    for phase in ("generation", "update"):
        a, b = statistics.median(seconds[phase, True]), statistics.median(seconds[phase, False])
        label = "generation" if phase == "generation" else "update forward+backward"
        print(f"| {label} | {a:.2f} | {b:.2f} | {a / b:.2f}x |")


if __name__ == "__main__":
    run()
