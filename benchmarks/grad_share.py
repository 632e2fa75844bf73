"""How hard ReLaX pushes: ``grad_share``, the norm of ``alpha * L_xp``'s gradient at the final hidden states over
the norm of the policy loss's gradient there, on the embedded model's own responses, one factor at a time.

    python benchmarks/grad_share.py                       # about 10 minutes on 2 CPU cores
    python benchmarks/grad_share.py --tiny                # a tiny random model, seconds (checks the code path)

What it does: samples ``--prompts`` x 16 responses of up to ``--max-new-tokens`` tokens once, keeps their
final-norm hidden states, fits a Koopman dictionary for each m, then evaluates both gradients exactly for many
settings without any further forward of the model. That is possible because at the first mini-batch (ratio 1,
nothing clipped) the token-mean policy loss sends ``-(A_i / N) dlogp_t/dh_t`` to each token's state, and
``L_xp`` sends ``-(w_i a_i / G) dDSD_i/dh_i`` to each response's states (docs/method.md, "Strength"): the
per-token norms ``|dlogp_t/dh_t|`` and per-response norms ``|dDSD_i/dh_i|`` are computed once and only the
advantages, weights and counts change between settings. Rewards are drawn Bernoulli(p) per response (``--draws``
draws per setting, mean reported); alpha = 0.1 throughout.

The base point is the paper's setting as far as this machine allows (Table 3: 16 responses per prompt, m = 50,
responses padded to 3072 tokens in the authors' units; responses here are at most ``--max-new-tokens`` long).
Each row changes one factor; the printed table is what docs/method.md's "Strength" section reports.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

from relax_pl import objectives as obj
from relax_pl.callbacks.latent_exploration import latent_exploration_loss
from relax_pl.cli import main
from relax_pl.koopman import KoopmanDictionary, dsd, fit_dictionary

ALPHA = 0.1


@dataclass
class Sample:
    hidden: torch.Tensor  # (N, T, d) final-norm states at the response tokens
    mask: torch.Tensor  # (N, T)
    logp_grad_sq: torch.Tensor  # (N, T) |dlogp_t/dh_t|^2 at the states that predict each token
    group_size: int


def sample(recipe: str, prompts: int, group: int, max_new_tokens: int, seed: int, overrides: list[str]) -> Sample:
    cli = main(
        ["--config", recipe, f"--seed_everything={seed}", f"--model.sampling.num_responses={group}",
         f"--model.sampling.max_new_tokens={max_new_tokens}", f"--data.batch_size={prompts}", "--trainer.logger=false",
         "--trainer.callbacks=[]", *overrides],
        run=False,
    )
    module, data = cli.model, cli.datamodule
    module.configure_model()
    module.policy.requires_grad_(False)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    start = time.perf_counter()
    with torch.no_grad():
        rollout = module.generate(batch)
    tokens = int(rollout.response_mask.sum())
    print(f"sampled {len(rollout)} responses, {tokens} tokens in {time.perf_counter() - start:.0f} s "
          f"(mean length {tokens / len(rollout):.0f}, max {int(rollout.response_mask.sum(-1).max())})", flush=True)
    hidden, masks, grads = [], [], []
    head = module.policy.get_output_embeddings()
    width = rollout.response_mask.shape[1]
    for rows in torch.arange(len(rollout)).split(4):
        with torch.no_grad():
            out = module.response_forward(module.policy, rollout, rows, keep_hidden=True)
        leaf = out.head_hidden.detach().requires_grad_()
        with torch.enable_grad():
            logp, _ = obj.token_logprobs_and_entropy(leaf, rollout.responses[rows, : leaf.shape[1]], head)
            (grad,) = torch.autograd.grad((logp * out.mask).sum(), leaf)  # each logp_t depends on its own h_t only
        pad = width - out.mask.shape[1]
        hidden.append(torch.nn.functional.pad(out.hidden.float(), (0, 0, 0, pad)))
        masks.append(torch.nn.functional.pad(out.mask, (0, pad)))
        grads.append(torch.nn.functional.pad((grad.float().square().sum(-1) * out.mask), (0, pad)))
    return Sample(torch.cat(hidden), torch.cat(masks), torch.cat(grads), group)


def dispersion_gradients(s: Sample, dictionary: KoopmanDictionary, length: int, spectrum: str, pad: int | None):
    """DSD, validity and |dDSD_i/dh_i|^2 of every response cut to its first ``length`` tokens."""
    hidden = s.hidden[:, :length].clone().requires_grad_()
    mask = s.mask[:, :length]
    with torch.enable_grad():
        values, valid = dsd(hidden, mask, dictionary, n_min=dictionary.proj.out_features + 1, spectrum=spectrum,
                            padded_length=pad)
        (grad,) = torch.autograd.grad(values.sum(), hidden)  # DSD_i depends on response i's states only
    return values.detach(), valid, grad.double().square().sum((1, 2))


def share(s: Sample, values, valid, dsd_grad_sq, group: int, length: int, p: float, draws: int) -> float:
    """Mean over reward draws of |grad alpha L_xp| / |grad pg_loss| for the first ``group`` responses of each
    prompt, with Bernoulli(p) rewards."""
    per_prompt = s.hidden.shape[0] // s.group_size
    rows = (torch.arange(per_prompt)[:, None] * s.group_size + torch.arange(group)).flatten()
    mask = s.mask[rows, :length]
    token_grad_sq = (s.logp_grad_sq[rows, :length] * mask).sum(-1).double()
    generator = torch.Generator().manual_seed(0)
    shares = []
    for _ in range(draws):
        rewards = (torch.rand(len(rows), generator=generator) < p).float()
        advantages = obj.group_advantages(rewards, group).double()
        pg = ((advantages / mask.sum()).square() * token_grad_sq).sum().sqrt()
        # the per-response coefficient of dDSD_i/dh in L_xp's gradient: d L_xp / d D_i (no row over xi)
        d = values[rows].clone().requires_grad_()
        groups = torch.arange(len(rows)) // group
        none = torch.zeros(len(rows), dtype=torch.bool)
        with torch.enable_grad():
            (coefficient,) = torch.autograd.grad(
                ALPHA * latent_exploration_loss(d, valid[rows], none, advantages, groups), d, allow_unused=True
            )
        coefficient = torch.zeros_like(d) if coefficient is None else coefficient
        xp = (coefficient.square() * dsd_grad_sq[rows]).sum().sqrt()
        if pg > 0:
            shares.append(float(xp / pg))
    return statistics.fmean(shares) if shares else float("nan")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="recipes/relax_small.yaml")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--draws", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model (run `python -m relax_pl.testing runs/tiny_qwen2` first)")
    args = parser.parse_args()
    overrides = ["--model.pretrained=runs/tiny_qwen2"] if args.tiny else []
    s = sample(args.recipe, args.prompts, 16, args.max_new_tokens, args.seed, overrides)
    trajectories = [h[m] for h, m in zip(s.hidden, s.mask)]
    dictionaries = {}
    for m in (8, 16, 50):
        dictionary = KoopmanDictionary(s.hidden.shape[-1], m, seed=0)
        usable = [t for t in trajectories if t.shape[0] > m + 2]
        report = fit_dictionary(dictionary, usable, steps=50, lr=1e-4, batch_size=64)
        dictionaries[m] = dictionary
        print(f"m={m}: fitted on {len(usable)} responses, residual {report.initial_loss:.3g} -> {report.final_loss:.3g}")
    full = s.hidden.shape[1]
    base = {"group": 16, "length": full, "m": 50, "p": 0.5, "pad": 3072}
    rows = [("base (paper-like)", base)]
    rows += [(f"group size {g}", {**base, "group": g}) for g in (4, 8)]
    rows += [(f"response length <= {t}", {**base, "length": t}) for t in (64, 128, 256) if t < full]
    rows += [(f"m = {m}", {**base, "m": m}) for m in (8, 16)]
    rows += [(f"P(reward = 1) = {p}", {**base, "p": p}) for p in (0.125, 0.875)]
    rows += [(f"sv padded to {pad}", {**base, "pad": pad}) for pad in (full, None)]
    print(f"\ngrad_share = |grad_h alpha L_xp| / |grad_h pg_loss| at alpha = {ALPHA}, mean of {args.draws} reward draws; "
          f"{s.hidden.shape[0] // 16} prompts x 16 responses, at most {full} tokens\n")
    print("| setting | grad_share sv_compat | grad_share eig | DSD sv (mean) | DSD eig (mean) | valid |")
    print("|---|---|---|---|---|---|")
    for name, point in rows:
        cells, dsds = [], []
        for spectrum in ("sv_compat", "eig"):
            pad = point["pad"] if spectrum == "sv_compat" else None
            values, valid, grad_sq = dispersion_gradients(s, dictionaries[point["m"]], point["length"], spectrum, pad)
            cells.append(share(s, values, valid, grad_sq, point["group"], point["length"], point["p"], args.draws))
            dsds.append(float(values[valid].mean()) if valid.any() else float("nan"))
        print(f"| {name} | {cells[0]:.4f} | {cells[1]:.4f} | {dsds[0]:.3g} | {dsds[1]:.3g} | {float(valid.float().mean()):.2f} |")
