"""The update's forward and backward with ``objectives.LogprobEntropy`` (log-prob and entropy with a written-out
backward) against plain autograd through ``logsumexp``, ``gather`` and ``softmax``, on one quickstart rollout.

    python benchmarks/logprob_backward.py             # recipes/quickstart.yaml, 6 rounds (~3 min on 2 cores)
    python benchmarks/logprob_backward.py --rounds 10

Both run over the same 32 responses in micro-batches of the recipe's size, alternating which goes first each round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import relax_pl.objectives as obj
from relax_pl.cli import main
from relax_pl.rollout import generate


def autograd_chunk(hidden, tokens, head, temperature):
    """The vocabulary step as it was before ``LogprobEntropy``: autograd through every operation."""
    logits = head(hidden)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    log_z = logits.logsumexp(-1)
    logp = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - log_z
    return logp, log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)


VARIANTS = {"LogprobEntropy": obj._logprob_entropy_chunk, "autograd": autograd_chunk}


def update_seconds(module, rollout, micro_batch_size: int) -> float:
    module.policy.zero_grad(set_to_none=True)
    start = time.perf_counter()
    for first in range(0, len(rollout), micro_batch_size):
        rows = torch.arange(first, min(first + micro_batch_size, len(rollout)))
        logp, _, mask, _, _ = module.response_forward(module.policy, rollout, rows, False)
        ((logp * mask).sum() / mask.sum()).backward()
    return time.perf_counter() - start


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="recipes/quickstart.yaml")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    cli = main(["--config", args.config, "--trainer.logger=false", "--trainer.callbacks=[]",
                "--trainer.enable_checkpointing=false"], run=False)
    module = cli.model
    module.configure_model()
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    torch.manual_seed(0)
    rollout = generate(
        module.policy, module.tokenizer, [module.render_prompt(s) for s in batch], batch, module.sampling
    )
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name in list(VARIANTS)[:: 1 if round_ % 2 == 0 else -1]:
            obj._logprob_entropy_chunk = VARIANTS[name]
            seconds[name].append(update_seconds(module, rollout, module.update.micro_batch_size))
    obj._logprob_entropy_chunk = VARIANTS["LogprobEntropy"]
    print(f"\n{args.config}: {len(rollout)} responses, {int(rollout.response_mask.sum())} response tokens, "
          f"micro-batch {module.update.micro_batch_size}, {args.rounds} rounds, {torch.get_num_threads()} threads")
    print("| vocabulary step | forward+backward median (s) | every round (s) |\n|---|---|---|")
    for name, values in seconds.items():
        print(f"| {name} | {statistics.median(values):.2f} | {' '.join(f'{v:.2f}' for v in values)} |")
    ratio = statistics.median(seconds["LogprobEntropy"]) / statistics.median(seconds["autograd"])
    print(f"| LogprobEntropy / autograd | {ratio:.2f}x | |")
