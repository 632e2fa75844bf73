"""What `python -m relax_pl fit` prints, and that what it saves as config.yaml is a recipe that re-runs the run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from relax_pl.cli import main

from probes import tiny_recipe

# library output a user of relax_pl has no use for (issue 18, item 5)
LIBRARY_LINES = [
    "JsonargparseWarning", "Unable to serialize", "GPU available", "TPU available", "litlogger", "LeafSpec",
    "manual optimization", "Loading weights", "Epoch 0/", "not resumable", "unreliable results", "v_num",
    "was configured so",
]
RESUME_LINES = ["exists and is not empty"]  # said by a new run writing into a used folder, not by a resume


def fit(recipe: Path, *args: str) -> str:
    """Run ``python -m relax_pl fit`` in its own process; its stdout and stderr together."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_a_fit_prints_what_runs_one_bar_of_optimiser_steps_and_where_things_are(tmp_path, tiny_model, capsys):
    """Two RL steps of two optimiser steps each (two PPO epochs), validated after the second, then resumed from the
    mid-epoch checkpoint for one more RL step: no library noise, a bar counting optimiser steps of max_steps, the
    validation results, and where the logs and checkpoints are."""
    recipe = tiny_recipe(
        tmp_path, tiny_model,
        trainer={"max_steps": 4, "enable_progress_bar": True, "limit_val_batches": 1, "val_check_interval": 2},
        model={"update": {"micro_batch_size": 4, "ppo_epochs": 2}},
        data={"val_source": "builtin:arithmetic", "val_batch_size": 2, "max_val_samples": 2},
    )
    printed = fit(recipe)
    for noise in LIBRARY_LINES:
        assert noise not in printed, f"{noise!r} printed:\n{printed}"
    assert f"fit: {tiny_model} (Qwen2ForCausalLM, " in printed and "on 1 cpu with SingleDevice" in printed
    assert f"logs: {tmp_path / 'tb' / 'version_0'}" in printed
    assert f"checkpoints: {tmp_path / 'checkpoints'}" in printed
    bar = re.findall(r"step: +\d+%\|[^|]*\| (\d+)/(\d+) .*?s/step", printed)
    assert bar and {total for _, total in bar} == {"4"}, printed  # optimiser steps of max_steps, not batches
    assert bar[-1][0] == "4" and "2" in {n for n, _ in bar}
    assert re.search(r"reward=[\d.]+", printed)
    assert re.search(r"validation at step 4: .*val/accuracy [\d.]+.*val/reward [\d.]+", printed), printed
    assert f"done at step 4; last checkpoint: {tmp_path / 'checkpoints' / 'last.ckpt'}" in printed

    # 12 prompts in batches of 2: step 4 is mid-epoch, where Lightning warned that the loader is not resumable
    resumed = fit(recipe, "--trainer.max_steps", "6", "--ckpt_path", "last")
    for noise in LIBRARY_LINES + RESUME_LINES:
        assert noise not in resumed, f"{noise!r} printed on resume:\n{resumed}"
    assert re.search(r"step: +67%\|[^|]*\| 4/6 ", resumed)  # the bar starts at the checkpoint's step
    assert "done at step 6" in resumed

    # the config.yaml the run saved is a recipe: it parses and resolves to the run's own config
    saved = tmp_path / "tb" / "version_0" / "config.yaml"
    assert "Unable to serialize" not in saved.read_text()
    for config in (recipe, saved):
        with pytest.raises(SystemExit):
            main(["fit", "--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", "last", "--print_config"])
    original, from_saved = capsys.readouterr().out.split("# lightning.pytorch==")[1:]
    assert original == from_saved


def test_help_lists_the_commands_that_exist_and_export_says_it_writes_bfloat16(capsys):
    """``--help`` listed ``predict``, which RLVRModule cannot run, and not ``export``; export's help names its dtype."""
    with pytest.raises(SystemExit):
        main(["--help"])
    usage = capsys.readouterr().out
    assert "export" in usage and "bfloat16" in usage and "predict" not in usage
    assert "{fit,validate,test}" in usage
    done = subprocess.run([sys.executable, "-m", "relax_pl", "export", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "default: bfloat16, so a float32 run is downcast" in " ".join(done.stdout.split())
