"""Vision-language step profile: a randomly initialised model shaped like Qwen2.5-VL-3B-Instruct trained with
GRPO on the built-in geometry figures; time per phase, generation tokens/s and peak GPU memory.

    python benchmarks/vl_gpu.py                       # one GPU, bf16, 3 steps
    python benchmarks/vl_gpu.py --relax               # with KoopmanFit + LatentExploration (gated KL)
    python benchmarks/vl_gpu.py --tiny                # a two-layer model on the CPU (a smoke test of this script)

The weights are random (initialised on the device; nothing is downloaded) and the tokenizer is the 402-token test
tokenizer, so responses run to max_new_tokens: the numbers measure the machinery, not a model. The first step
includes one-off costs (the reward worker's start, the Koopman fit) and is shown apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning as L
import torch
from step_profile import PHASES, StepRecorder, table
from transformers import AutoConfig, AutoModelForImageTextToText, Qwen2_5_VLConfig

from relax_pl.data import PromptDataModule
from relax_pl.config import ObjectiveConfig, OptimizerConfig, UpdateConfig, ValidationConfig
from relax_pl.module import RLVRModule
from relax_pl.rewards import Geo3kReward
from relax_pl.rollout import SamplingConfig
from relax_pl.setups import DTYPES, SingleDevice, enable_gradient_checkpointing
from relax_pl.testing import build_test_vl_tokenizer, tiny_vl_config
from relax_pl.vision import VisionConfig

SYSTEM = "Given the images and the question, please reason step by step, and put your final answer within \\boxed{}."


def qwen2_5_vl_3b_config(tokenizer) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL-3B-Instruct's shapes (3.75B parameters), with the test tokenizer's vision token ids."""
    ids = tokenizer.convert_tokens_to_ids
    pad = tokenizer.pad_token_id
    text = dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
        num_key_value_heads=2, max_position_embeddings=128000, tie_word_embeddings=True, rms_norm_eps=1e-6,
        bos_token_id=pad, eos_token_id=pad, pad_token_id=pad,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    )
    vision = dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
        spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    )
    return Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=True,
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )


class RandomInit(SingleDevice):
    """SingleDevice whose policy is built from ``config.json`` with random weights, directly on the device."""

    def build_policy(self, pretrained: str, trust_remote_code: bool = False, device: torch.device | None = None):
        config = AutoConfig.from_pretrained(pretrained)
        with torch.device(device or "cpu"):
            policy = AutoModelForImageTextToText.from_config(config, dtype=DTYPES[self.dtype])
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        return policy


def write_checkpoint_files(folder: Path, tiny: bool, max_pixels: int) -> None:
    """config.json, the tokenizer and the image processor: all of a checkpoint but its weights."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = build_test_vl_tokenizer()
    config = tiny_vl_config("qwen2_5_vl", tokenizer) if tiny else qwen2_5_vl_3b_config(tokenizer)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=4 * 28 * 28, max_pixels=max_pixels).save_pretrained(folder)


def run(args: argparse.Namespace) -> list[dict[str, float]]:
    gpu = not args.tiny
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint_files(Path(folder), args.tiny, args.max_pixels)
        module = RLVRModule(
            folder,
            setup=RandomInit(dtype="bfloat16" if gpu else "float32", gradient_checkpointing=gpu),
            reward=Geo3kReward(),
            sampling=SamplingConfig(
                num_responses=args.responses, max_new_tokens=args.max_new_tokens, temperature=1.0,
                max_prompt_tokens=4096,
            ),
            objective=ObjectiveConfig(kl_coef=0.0 if args.relax else 0.01),  # ReLaX brings its own (gated) KL
            update=UpdateConfig(micro_batch_size=args.micro_batch_size),
            optimizer=OptimizerConfig(lr=1e-6),
            validation=ValidationConfig(),
            vision=VisionConfig(max_pixels=args.max_pixels),
        )
        data = PromptDataModule(
            "builtin:geometry", image_key="images", system_prompt=SYSTEM, batch_size=args.prompts,
            task_options={"num_samples": args.prompts * args.steps, "image_size": args.image_size},
        )
        callbacks: list[L.Callback] = [recorder := StepRecorder()]
        if args.relax:
            from relax_pl.callbacks import KoopmanFit, LatentExploration

            m, n_min = (4, 5) if args.tiny else (50, None)  # paper: m = 50 (tiny responses are 16 tokens)
            callbacks += [KoopmanFit(m=m), LatentExploration(xi_mode="relative", kl_coef=0.01, n_min=n_min)]
        trainer = L.Trainer(
            accelerator="gpu" if gpu else "cpu", devices=1, max_steps=args.steps, logger=False,
            enable_checkpointing=False, limit_val_batches=0, callbacks=callbacks, default_root_dir=folder,
            enable_progress_bar=False,
        )
        trainer.fit(module, data)
        if gpu:
            for step in recorder.steps:
                step.setdefault("perf/max_memory_allocated_gb", torch.cuda.max_memory_allocated() / 2**30)
    return recorder.steps


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a two-layer model on the CPU")
    parser.add_argument("--relax", action="store_true", help="add KoopmanFit and LatentExploration")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step (default 16; tiny: 2)")
    parser.add_argument("--responses", type=int, default=None, help="responses per prompt (default 5; tiny: 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 512; tiny: 16")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="default 8; tiny: 4")
    parser.add_argument("--image-size", type=int, default=448, help="figure side in pixels (448: 256 image tokens)")
    parser.add_argument("--max-pixels", type=int, default=448 * 448)
    parser.add_argument("--out", default=None, help="also write the per-step metrics to this JSON file")
    args = parser.parse_args()
    defaults = dict(prompts=(2, 16), responses=(4, 5), max_new_tokens=(16, 512), micro_batch_size=(4, 8))
    for name, (tiny, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    if args.tiny:
        args.image_size, args.max_pixels = min(args.image_size, 112), min(args.max_pixels, 112 * 112)
    steps = run(args)
    shape = "tiny Qwen2.5-VL" if args.tiny else "Qwen2.5-VL-3B-shaped (random weights)"
    print(f"\n{shape}: {args.prompts} prompts x {args.responses} responses, {args.max_new_tokens} new tokens, "
          f"{args.image_size}px figures{', ReLaX' if args.relax else ''}; {len(steps)} steps")
    print(table(steps))
    if "perf/max_memory_allocated_gb" in steps[-1]:
        print(f"peak GPU memory: {steps[-1]['perf/max_memory_allocated_gb']:.1f} GiB")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "phases": PHASES, "steps": steps}, indent=1))
