"""Every policy-loss plug-in, the LoRA setup and (where vLLM is installed) the VLLM engine's weight-sync check, two
rollouts (two optimiser steps each) on one device: does each run there, move the weights, how long is its step.

    python benchmarks/plugins_gpu.py           # GPU: a random 0.5B-shaped Qwen2 (Qwen2.5-0.5B's layers), bf16
    python benchmarks/plugins_gpu.py --tiny    # CPU: a tiny random Qwen2 in float32 (checks the script)

Rows: ``PPOClip`` (the default), ``GSPO``, ``CISPO``, ``ClipCov``, ``KLCov`` under full fine-tuning; ``LoRA``
(PPOClip on an adapter); with vLLM, ``VLLM`` and ``VLLM+LoRA`` (the engine synced after every step, the sync probe's
and the rollout's log-prob gaps logged and checked against the default bound) and ``VLLM stale`` (syncs after
the first do nothing: the check must stop the run at the second rollout). The reward is the response length's
parity, so that the groups' rewards differ and every loss has something to push; ``moved`` is the largest change of a
trainable weight.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import lightning as L
import torch
import yaml

from relax_pl.cli import main
from relax_pl.rewards import VerifiableReward
from relax_pl.rollout import WeightSyncError
from relax_pl.testing import save_tiny_model

# Qwen2.5-0.5B's layers over the test tokenizer's 512-token vocabulary (a functional check, not a speed benchmark)
HALF_B = dict(hidden_size=896, layers=24, heads=14, kv_heads=2, intermediate=4864)
TINY = dict(hidden_size=64, heads=2, kv_heads=1, intermediate=128)  # vLLM's CPU attention takes heads >= 32 wide
LOSSES = ["PPOClip", "GSPO", "CISPO", "ClipCov", "KLCov"]


class LengthParity(VerifiableReward):
    def score(self, completion: str, sample: dict) -> dict[str, float]:
        return {"overall": float(len(completion) % 2)}




class StepRecorder(L.Callback):
    """Each step's logged metrics, and the trainable weights as the fit starts."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, module) -> None:
        trainable = [(n, p) for n, p in module.policy.named_parameters() if p.requires_grad]
        self.start = {n: p.detach().float().cpu().clone() for n, p in trainable}

    def on_train_batch_end(self, trainer, *args) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def recipe(model: Path, out: Path, tiny: bool, setup: dict | None, loss: str, rollout: dict | None) -> dict:
    gpu = not tiny
    dtype = "bfloat16" if gpu else "float32"
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "gpu" if gpu else "cpu", "devices": 1, "max_steps": 4, "logger": False,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "limit_val_batches": 0, "num_sanity_val_steps": 0, "default_root_dir": str(out),
        },
        "model": {
            "pretrained": str(model),
            "setup": setup or {"class_path": "relax_pl.setups.SingleDevice", "init_args": {"dtype": dtype}},
            "reward": {"class_path": "__main__.LengthParity"},
            "sampling": {"num_responses": 4, "max_new_tokens": 12 if tiny else 128, "temperature": 1.0},
            "objective": {"policy_loss": {"class_path": f"relax_pl.losses.{loss}"}},
            # two optimiser steps per rollout: KL-Cov's penalty and the clipped ratios have an old policy to differ from
            "update": {"micro_batch_size": 8, "mini_batch_size": 8},
            "optimizer": {"lr": 1e-3 if tiny else 1e-5},
            **({"rollout": rollout} if rollout else {}),
        },
        "data": {"train_source": "builtin:arithmetic", "task_options": {"num_samples": 64}, "batch_size": 4},
    }


def run(name: str, config: dict, folder: Path) -> str:
    path = folder / f"{name.replace(' ', '_').replace('+', '_')}.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["--config", str(path)], run=False)
    recorder = StepRecorder()
    cli.trainer.callbacks.append(recorder)
    error = ""
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    except WeightSyncError as caught:
        error = str(caught).split(" (largest")[0]
    after = dict(cli.model.policy.named_parameters())
    moved = max(float((after[n].detach().float().cpu() - b).abs().max()) for n, b in recorder.start.items())
    step = recorder.steps[-1] if recorder.steps else {}
    cells = [
        name, str(len(recorder.steps)), f"{step.get('timing_s/step', float('nan')):.2f}", f"{moved:.2e}",
        f"{step.get('actor/pg_loss', float('nan')):+.3g}", f"{step.get('rollout/sync_probe_gap', float('nan')):.2e}",
        f"{step.get('rollout/logp_abs_diff', float('nan')):.2e}", error or "-",
    ]
    return "| " + " | ".join(cells) + " |"


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model on the CPU (checks the script)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
    import importlib.util

    has_vllm = importlib.util.find_spec("vllm") is not None
    lora = {"class_path": "relax_pl.setups.LoRA",
            "init_args": {"dtype": "float32" if args.tiny else "bfloat16", "rank": 8, "dropout": 0.0}}
    vllm = {"class_path": "relax_pl.rollout.VLLM"}
    runs = [(loss, None, loss, None) for loss in LOSSES] + [("LoRA", lora, "PPOClip", None)]
    if has_vllm:
        runs += [("VLLM", None, "PPOClip", vllm), ("VLLM+LoRA", lora, "PPOClip", vllm),
                 ("VLLM stale", None, "PPOClip", {"class_path": "relax_pl.testing.StaleVLLM"})]
    else:
        print("vLLM is not installed here: no VLLM rows (the weight-sync check needs the engine)")
    with tempfile.TemporaryDirectory() as workdir:
        folder = Path(workdir)
        model = save_tiny_model(folder / "model", kind="qwen2", **(TINY if args.tiny else HALF_B))
        print("| run | steps | step (s) | moved | pg_loss | sync probe gap | rollout gap | sync check |")
        print("|---|---|---|---|---|---|---|---|", flush=True)
        for name, setup, loss, rollout in runs:
            print(run(name, recipe(model, folder / name, args.tiny, setup, loss, rollout), folder), flush=True)


if __name__ == "__main__":
    main_cli()
