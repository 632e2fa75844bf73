"""Cost of the ReLaX DSD term next to the policy update it rides on, and of the one-time dictionary fit.

    python benchmarks/dsd_overhead.py                                   # SmolLM2-135M, CPU, 8 x 256 tokens
    python benchmarks/dsd_overhead.py --threads 1                       # a CPU shared with other jobs
    python benchmarks/dsd_overhead.py --model qwen2.5-1.5b-shape --tokens 16x2048 --device cuda

On one micro-batch of responses, each repeat times, side by side:

* policy fwd+bwd: the policy forward with the final-norm hook, chunked log-probs and entropy, and backward,
  as RLVRModule's update runs it;
* DSD fwd+bwd: ``dsd`` + ``latent_exploration_loss`` on the same hidden states (a leaf with grad) and its
  backward to them, which is all the DSD term adds to the update;

then fits the dictionary on ``--fit-trajectories`` responses of the same length (paper: 64 trajectories).
Tokens are random (the timing does not depend on the text); ``qwen2.5-1.5b-shape`` is a random model with
Qwen2.5-1.5B's shape, with gradient checkpointing on CUDA. On a CPU that other processes also load, give
``--threads 1``: two OpenMP threads contending for cores slow the many small m x m operations of DSD and the
fit about 50-fold (measured: DSD 0.97 s instead of 0.018 s, fit 153 s instead of 9 s), the policy about 2-fold.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from relax_pl import objectives as obj
from relax_pl.callbacks.latent_exploration import latent_exploration_loss
from relax_pl.koopman import KoopmanDictionary, dsd, fit_dictionary
from relax_pl.families import final_norm
from relax_pl.forward import capture_output
from relax_pl.models import EMBEDDED_MODEL, load_causal_lm

PROMPT_TOKENS = 32
MODELS = ["smollm2-135m", "qwen2.5-1.5b-shape"]


def build_model(name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    if name == "smollm2-135m":
        model = load_causal_lm(EMBEDDED_MODEL).to(device=device, dtype=dtype)
    else:
        config = Qwen2Config(
            vocab_size=151936, hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
            intermediate_size=8960, max_position_embeddings=32768, tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
        if device.type == "cuda":  # as the anchors' 1.0 s measurement: 16 x 2048 tokens fit only this way
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_step(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Seconds of the policy forward+backward; returns the detached response hidden states too."""
    device = input_ids.device
    sync(device)
    start = time.perf_counter()
    with capture_output(final_norm(model)) as captured:
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    hidden = captured[0]
    logp, entropy = obj.token_logprobs_and_entropy(
        hidden[:, PROMPT_TOKENS - 1 : -1], input_ids[:, PROMPT_TOKENS:], model.get_output_embeddings()
    )
    (-logp.mean() - 1e-3 * entropy.mean()).backward()
    sync(device)
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, hidden[:, PROMPT_TOKENS:].detach()


def dsd_step(hidden: torch.Tensor, dictionary: KoopmanDictionary) -> float:
    """Seconds of the DSD term's forward+backward (L_xp over two prompt groups, all responses valid)."""
    device = hidden.device
    hidden = hidden.clone().requires_grad_(True)
    n = hidden.shape[0]
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=device)
    advantages = torch.linspace(-1.0, 1.0, n, device=device)
    groups = torch.arange(n, device=device) // max(n // 2, 1)
    sync(device)
    start = time.perf_counter()
    values, valid = dsd(hidden, mask, dictionary)
    loss = latent_exploration_loss(values, valid, torch.zeros_like(valid), advantages, groups)
    loss.backward()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2-135m")
    parser.add_argument("--tokens", default="8x256", help="responses x tokens of the micro-batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: float32 on CPU, bf16 on CUDA")
    parser.add_argument("--m", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--fit-trajectories", type=int, default=64)
    parser.add_argument("--fit-steps", type=int, default=50)
    args = parser.parse_args()
    responses, tokens = (int(x) for x in args.tokens.lower().split("x"))
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build_model(args.model, device, dtype)
    vocab = model.get_output_embeddings().weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(vocab, (responses, PROMPT_TOKENS + tokens), generator=generator).to(device)
    dictionary = KoopmanDictionary(model.config.hidden_size, args.m, seed=0).to(device).requires_grad_(False)

    policy, term, ratios = [], [], []
    for repeat in range(args.repeats + 1):  # repeat 0 warms up allocators and kernels
        seconds, hidden = policy_step(model, input_ids)
        dsd_seconds = dsd_step(hidden, dictionary)
        if repeat:
            policy.append(seconds)
            term.append(dsd_seconds)
            ratios.append(dsd_seconds / seconds)

    trajectories = []
    with torch.no_grad():
        while len(trajectories) < args.fit_trajectories:
            ids = torch.randint(vocab, (responses, PROMPT_TOKENS + tokens), generator=generator).to(device)
            with capture_output(final_norm(model)) as captured:
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            trajectories += [h.float() for h in captured[0][:, PROMPT_TOKENS:]]
    trajectories = trajectories[: args.fit_trajectories]
    fit_dict = KoopmanDictionary(model.config.hidden_size, args.m, seed=0).to(device)
    report = fit_dictionary(fit_dict, trajectories, steps=args.fit_steps)

    rows = [
        f"DSD overhead: {args.model} ({str(dtype).removeprefix('torch.')}, {device}), micro-batch {responses} x "
        f"{tokens} tokens, d={model.config.hidden_size}, m={args.m}; {args.repeats} repeats",
        f"{'':<34}{'median':>12}{'min':>12}",
        f"{'policy fwd+bwd':<34}{statistics.median(policy):>10.4f} s{min(policy):>10.4f} s",
        f"{'DSD fwd+bwd (dsd + L_xp)':<34}{statistics.median(term):>10.4f} s{min(term):>10.4f} s",
        f"{'DSD / policy (same repeat)':<34}{statistics.median(ratios):>12.2%}{min(ratios):>12.2%}   (goal <= 2%)",
        f"{f'dictionary fit ({len(trajectories)} x {tokens}, {args.fit_steps} steps)':<34}{report.seconds:>10.2f} s"
        f"{'':>12}   (goal < 10 s)",
        f"{'fit residual initial -> final':<34}{report.initial_loss:>12.4g} -> {report.final_loss:.4g}",
        f"{'cond(X) median, saturated':<34}{report.cond_x:>12.3g}    {report.saturated_fraction:.1%}",
    ]
    print("\n".join(rows))


if __name__ == "__main__":
    main()
