"""Peak memory and time per phase of GRPO steps under the QLoRA and FSDP setups (for when a GPU is lent).

    python benchmarks/setups_gpu.py                # GPU: Qwen2.5-7B-shaped random model; QLoRA, then FSDP on 1 GPU
    python benchmarks/setups_gpu.py --tiny         # CPU smoke run: tiny random model, FSDP over 2 CPU processes
    python benchmarks/setups_gpu.py --setup qlora  # one setup only

Each step samples 4 prompts x 4 responses x 1024 new tokens (random weights never stop early), scores them,
computes reference log-probs (QLoRA: the adapter disabled; FSDP: a sharded copy) and takes one optimiser step
with gradient checkpointing. FSDP on one GPU keeps bf16 master weights and AdamW state (7.6B x 8 bytes = 61 GB),
so that policy, reference and optimiser fit next to the KV cache. Each setup runs in its own process, so peak
memory is its own; the first step includes one-off costs (allocator warm-up, the reward worker) and is shown apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from relax_pl.cli import main
from relax_pl.testing import build_test_tokenizer, save_tiny_model

PHASES = ["gen", "reward", "ref", "update", "step"]


def qwen25_7b_config(vocab_size: int) -> Qwen2Config:
    """Qwen2.5-7B's shape (28 layers, d=3584, 28 query / 4 key-value heads, SwiGLU 18944, untied head)."""
    return Qwen2Config(
        vocab_size=vocab_size, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1e6,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )


def save_7b_shaped_model(folder: Path) -> Path:
    """A random bf16 model of Qwen2.5-7B's shape, built on the GPU and saved like a hub checkpoint.

    Its vocabulary is Qwen2.5's size (152,064), so the head costs what it really costs; the test tokenizer
    (512 tokens) renders the prompts, and sampled ids beyond it decode to nothing.
    """
    tokenizer = build_test_tokenizer()
    pad = tokenizer.pad_token_id
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(qwen25_7b_config(152064))
    torch.set_default_dtype(torch.float32)
    model.config.pad_token_id = model.config.eos_token_id = pad
    model.generation_config = GenerationConfig(eos_token_id=[pad], pad_token_id=pad)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    return folder


def recipe(model: Path, setup: str, tiny: bool, out: Path) -> dict:
    gpu = not tiny
    if setup == "qlora":
        setup_config = {"class_path": "relax_pl.setups.QLoRA",
                        "init_args": {"dtype": "bfloat16" if gpu else "float32", "gradient_checkpointing": True}}
    else:
        setup_config = {"class_path": "relax_pl.setups.FSDP",
                        "init_args": {"dtype": "bfloat16" if gpu else "float32", "gradient_checkpointing": True}}
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if gpu else "cpu",
            "devices": 2 if setup == "fsdp" and not gpu else 1,
            "max_steps": 2, "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "enable_model_summary": False, "limit_val_batches": 0, "num_sanity_val_steps": 0,
            "default_root_dir": str(out),
        },
        "model": {
            "pretrained": str(model),
            "setup": setup_config,
            "sampling": {"num_responses": 4, "max_new_tokens": 16 if tiny else 1024, "temperature": 1.0},
            "objective": {"kl_coef": 0.01},
            "update": {"micro_batch_size": 4},
            "optimizer": {"lr": 1e-5},
        },
        "data": {"train_source": "builtin:arithmetic", "task_options": {"num_samples": 64}, "batch_size": 4 if gpu else 2},
    }


class StepRecorder(L.Callback):
    """Phase times (the module's timing_s/* metrics) and the peak memory of every step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, *args) -> None:
        step = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("timing_s/", "perf/"))}
        step["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else step["perf/max_rss_gb"]
        self.steps.append(step)


def run_one(setup: str, tiny: bool, workdir: Path) -> None:
    """Run two steps of one setup and print its measurements as one JSON line (rank 0)."""
    model = workdir / ("tiny" if tiny else "qwen2.5-7b-shaped")
    if os.environ.get("LOCAL_RANK", "0") == "0" and not (model / "config.json").is_file():
        save_tiny_model(model) if tiny else save_7b_shaped_model(model)
    path = workdir / f"{setup}.yaml"
    path.write_text(yaml.safe_dump(recipe(model, setup, tiny, workdir / setup)))
    cli = main(["--config", str(path)], run=False)
    recorder = StepRecorder()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    if cli.trainer.global_rank == 0:
        print("RESULT " + json.dumps({"setup": setup, "steps": recorder.steps}), flush=True)


def table(setup: str, steps: list[dict[str, float]]) -> str:
    unit = "GiB GPU" if torch.cuda.is_available() else "GiB RSS"
    rows = [f"{setup}: {len(steps)} steps", f"  {'':<22}{'first step':>12}{'later':>12}"]
    later = steps[-1]
    for phase in PHASES:
        key = f"timing_s/{phase}"
        if key in steps[0]:
            rows.append(f"  {key:<22}{steps[0][key]:>11.2f}s{later.get(key, 0.0):>11.2f}s")
    rows.append(f"  {'peak memory (' + unit + ')':<22}{steps[0]['peak_gb']:>12.1f}{later['peak_gb']:>12.1f}")
    rows.append(f"  {'perf/gen_tokens_per_s':<22}{steps[0]['perf/gen_tokens_per_s']:>12.1f}{later['perf/gen_tokens_per_s']:>12.1f}")
    return "\n".join(rows)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random model on the CPU (a smoke run)")
    parser.add_argument("--setup", choices=["qlora", "fsdp", "both"], default="both")
    parser.add_argument("--workdir", default=None, help="where the model and recipes are written (default: a temp dir)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
    if args.setup != "both":
        # Lightning starts the other CPU ranks by running this command again: they find the same folder here
        workdir = args.workdir or os.environ.setdefault("SETUPS_GPU_WORKDIR", tempfile.mkdtemp())
        run_one(args.setup, args.tiny, Path(workdir))
        sys.exit(0)
    with tempfile.TemporaryDirectory() as workdir:
        for setup in ("qlora", "fsdp"):
            command = [sys.executable, __file__, "--setup", setup, "--workdir", workdir] + (["--tiny"] if args.tiny else [])
            done = subprocess.run(command, capture_output=True, text=True)
            results = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not results:
                sys.exit(f"{setup} failed:\n{done.stderr[-4000:]}")
            print(table(setup, json.loads(results[-1].removeprefix("RESULT "))["steps"]), flush=True)
