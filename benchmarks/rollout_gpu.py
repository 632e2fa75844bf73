"""Rollout speed of ``HFGenerate``'s two caches (``model.rollout.init_args.cache``) and, where vLLM is installed,
of the ``VLLM`` engine, on a GPU.

    python benchmarks/rollout_gpu.py            # Qwen2.5-1.5B-shaped random model, bf16, 128 sequences x 512 new tokens
    python benchmarks/rollout_gpu.py --vllm     # the same, plus a row for relax_pl.rollout.VLLM (needs vLLM)
    python benchmarks/rollout_gpu.py --tiny     # a tiny random Qwen2 on the CPU, 16 x 16 (checks the script)

All sample the same way (temperature 1.0, no top-k/top-p). ``dynamic`` is HF ``generate`` with a growing cache and
each prompt encoded once for its responses; ``static`` a preallocated cache whose decoding step HF compiles
(torch.compile, CUDA graphs) on a GPU; on the CPU it is not compiled. ``VLLM`` goes through the module's seam: a
colocated engine (30% of the GPU's memory) that receives the model's weights before each call and sleeps after it,
as in a training step, so each call includes the weight sync and the wake-up. Each row generates the same batch
twice: the first call pays the compilation (and the engine's first sync), the second is the steady state. tokens/s
counts generated tokens (up to each response's end) over the whole call.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from transformers import Qwen2ForCausalLM

from relax_pl.data.tasks import arithmetic
from relax_pl.models import tiny_model_config
from relax_pl.rollout import SamplingConfig, generate
from relax_pl.testing import build_test_tokenizer

# Qwen2.5-1.5B's shape (weights random: speed does not depend on them)
QWEN25_15B = dict(
    vocab_size=151936, hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
    max_position_embeddings=32768, tie_word_embeddings=True,
)
TINY = dict(vocab_size=512, hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate=128)  # vLLM: heads >= 32 wide


def build(tiny: bool) -> tuple[torch.nn.Module, torch.device]:
    device = torch.device("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    config = tiny_model_config("qwen2", **(TINY if tiny else QWEN25_15B))
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(config).to(torch.float32 if tiny else torch.bfloat16)
    model.generation_config.eos_token_id = None  # random weights: only the test tokenizer's EOS stops a row
    return model.eval(), device


def timed(
    model, tokenizer, prompts: list[str], sampling: SamplingConfig, device: torch.device, cache: str
) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    rollout = generate(model, tokenizer, prompts, [{} for _ in prompts], sampling, cache=cache)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, int(rollout.response_mask.sum())


def vllm_engine(model, tokenizer, sampling: SamplingConfig, device: torch.device, folder: str):
    """A VLLM engine set up on ``model`` as the policy (the engine reads the saved config; the weights come from the
    policy, as in training), through the handle every engine gets: no module."""
    from relax_pl.rollout import VLLM, RolloutContext

    model.save_pretrained(folder)
    dtype = "float32" if device.type == "cpu" else "bfloat16"  # the model's own
    context = RolloutContext(
        tokenizer=tokenizer, policy=model, pretrained=folder, device=device, dtype=dtype,
        max_prompt_tokens=sampling.max_prompt_tokens, max_new_tokens=sampling.max_new_tokens,
    )
    engine = VLLM()
    engine.check(context)
    engine.setup(context)
    return engine


def timed_vllm(engine, prompts: list[str], sampling: SamplingConfig, device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    engine.policy_updated()  # as after an optimiser step: the call includes the weight sync and its check
    rollout = engine.generate(prompts, [{} for _ in prompts], sampling)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, int(rollout.response_mask.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU, 16 sequences x 16 tokens")
    parser.add_argument("--prompts", type=int, default=None, help="distinct prompts (default 16; --tiny 2)")
    parser.add_argument("--responses", type=int, default=8, help="responses per prompt")
    parser.add_argument("--new-tokens", type=int, default=None, help="new tokens per response (default 512; --tiny 16)")
    parser.add_argument("--vllm", action="store_true", help="add a row for relax_pl.rollout.VLLM (needs vLLM)")
    args = parser.parse_args()
    num_prompts = args.prompts or (2 if args.tiny else 16)
    new_tokens = args.new_tokens or (16 if args.tiny else 512)

    model, device = build(args.tiny)
    tokenizer = build_test_tokenizer()
    chats = [[{"role": "user", "content": row["problem"]}] for row in arithmetic("train", num_prompts, digits=3)]
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    sampling = SamplingConfig(num_responses=args.responses, max_new_tokens=new_tokens, temperature=1.0, top_k=0)
    print(f"{num_prompts} prompts x {args.responses} responses x {new_tokens} new tokens, {device.type}, "
          f"{next(model.parameters()).dtype}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    print("| engine | first call (s) | tokens/s (first) | second call (s) | tokens/s (second) |\n|---|---|---|---|---|")
    for cache in ("dynamic", "static"):
        first, first_tokens = timed(model, tokenizer, prompts, sampling, device, cache)
        second, tokens = timed(model, tokenizer, prompts, sampling, device, cache)
        speeds = f"{first_tokens / first:,.0f} | {second:.2f} | {tokens / second:,.0f}"
        print(f"| HFGenerate ({cache}) | {first:.2f} | {speeds} |", flush=True)
    if args.vllm:
        with tempfile.TemporaryDirectory() as folder:
            engine = vllm_engine(model, tokenizer, sampling, device, folder)
            first, first_tokens = timed_vllm(engine, prompts, sampling, device)
            second, tokens = timed_vllm(engine, prompts, sampling, device)
        speeds = f"{first_tokens / first:,.0f} | {second:.2f} | {tokens / second:,.0f}"
        print(f"| VLLM | {first:.2f} | {speeds} |", flush=True)


if __name__ == "__main__":
    main()
