"""Setups end to end: LoRA and QLoRA (an adapter on a float32 or 4-bit base) on the CPU, FSDP2 over two CPU
processes, export of each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM

from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.cli import main
from relax_pl.export import export, load_policy_state
from relax_pl.models import build_tiny_model, load_causal_lm
from relax_pl.objectives import kl_penalty
from relax_pl.setups import FSDP, QLoRA, SingleDevice, keep_cpu_weights_trainable
from relax_pl.testing import save_tiny_model

from probes import moved_weights, policy_weights, tiny_recipe

TESTS = Path(__file__).parent
LORA = {"dtype": "float32", "rank": 8, "alpha": 16, "dropout": 0.0}


@pytest.fixture(scope="module")
def early_stopping_model(tmp_path_factory) -> Path:
    """The tiny model with ~40% of its vocabulary as stop tokens: random sampling then ends responses at
    different lengths, so ranks finish generating at different steps."""
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2_stops", kind="qwen2", seed=0)
    config_path = folder / "generation_config.json"
    config = json.loads(config_path.read_text())
    config["eos_token_id"] = sorted(set(config["eos_token_id"]) | set(range(300, 512)))
    config_path.write_text(json.dumps(config))
    return folder


def write_recipe(
    folder: Path, pretrained: Path, setup: dict, max_steps: int = 2, callbacks: list[dict] = (), **model_keys
) -> Path:
    """Rewards that differ within groups (so a gradient), a KL term (so a reference); ``model_keys`` override."""
    return tiny_recipe(
        folder, pretrained, callbacks, logger=False,
        trainer={"max_steps": max_steps},
        model={
            "setup": setup,
            "reward": {"class_path": "probes.LengthParityReward"},
            "objective": {"kl_coef": 0.01},
            "optimizer": {"lr": 1e-2},
            **model_keys,
        },
    )


def qlora_setup(**init_args) -> dict:
    return {"class_path": "relax_pl.setups.QLoRA", "init_args": {**LORA, **init_args}}


# ------------------------------------------------------------------------------------------------ QLoRA
@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("qlora")
    recipe = write_recipe(folder, tiny_model, qlora_setup())
    cli = main(["fit", "--config", str(recipe)])
    return folder, recipe, cli.model


def four_bit_base(folder: Path, setup: QLoRA) -> torch.nn.Module:
    base = load_causal_lm(str(folder), dtype="float32", quantization_config=setup.quantization_config())
    keep_cpu_weights_trainable(base)  # as the policy's layers: no bf16 inference repacking on the CPU
    return prepare_model_for_kbit_training(base, use_gradient_checkpointing=False).eval()


def test_qlora_trains_the_adapter_only_and_the_reference_is_the_base(qlora_run, tiny_model):
    import bitsandbytes as bnb

    folder, _, module = qlora_run
    policy = module.policy.eval()
    assert isinstance(policy, PeftModel)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())
    assert module._reference[0] is None  # no second copy
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # the adapter moved (B starts at zero), the frozen 4-bit base did not
    assert all(p.abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)
    base = four_bit_base(tiny_model, module.model_setup)
    base_state = base.state_dict()
    for name, tensor in policy.get_base_model().state_dict().items():
        if "lora_" not in name:
            torch.testing.assert_close(tensor, base_state[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)

    batch = [module.trainer.datamodule.train_data[i] for i in range(2)]
    rollout = module.generate(batch)
    reference, context = module.model_setup.reference(policy, module._reference[0])
    with context:
        ref_logp = module.response_forward.logprobs(reference, rollout)
    base_logp = module.response_forward.logprobs(base, rollout)
    policy_logp = module.response_forward.logprobs(policy, rollout)
    mask = rollout.response_mask
    torch.testing.assert_close(ref_logp[mask], base_logp[mask], rtol=0, atol=1e-5)
    assert (policy_logp[mask] - base_logp[mask]).abs().max() > 1e-3  # the adapter is on outside the context

    # a callback's reference during the update (LatentExploration's gated KL): the adapter is off only inside it
    rows = torch.arange(len(rollout))
    logp = module.response_forward(policy, rollout, rows)[0]
    width = logp.shape[1]
    selected = torch.arange(len(rows)) % 2 == 0
    kl = module.reference_kl(rollout, rows, logp)(selected)
    expected = kl_penalty(policy_logp[selected, :width], base_logp[selected, :width])
    selected_mask = mask[selected, :width]
    torch.testing.assert_close(kl[selected_mask], expected[selected_mask], rtol=1e-4, atol=1e-5)
    policy.zero_grad(set_to_none=True)
    (kl * selected_mask).sum().backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for n, p in policy.named_parameters() if "lora_" in n)


def test_qlora_checkpoint_holds_adapter_and_optimizer_only(qlora_run):
    folder, _, module = qlora_run
    ckpt = load_checkpoint_file(folder / "checkpoints" / "last.ckpt")
    keys = set(ckpt["state_dict"])
    expected = {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    assert keys == expected
    state = ckpt["optimizer_states"][0]["state"]
    assert len(state) == len(expected) and all("exp_avg" in s for s in state.values())

    single = {f"policy.{n}": p for n, p in build_tiny_model(vocab_size=8).named_parameters()}
    with pytest.raises(ValueError, match="adapter tensors missing"):
        module.model_setup.check_checkpoint(module.policy, {"state_dict": single})


def test_qlora_resume_is_exact(tmp_path, tiny_model, qlora_run):
    straight_folder, _, _ = qlora_run
    recipe = write_recipe(tmp_path, tiny_model, qlora_setup(), max_steps=2)
    main(["fit", "--config", str(recipe), "--ckpt_path", str(straight_folder / "checkpoints" / "epoch=0-step=1.ckpt")])
    a = load_checkpoint_file(straight_folder / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for name, tensor in a["state_dict"].items():
        torch.testing.assert_close(tensor, b["state_dict"][name], rtol=0, atol=0, msg=name)
    # the resumed step trained the adapter: a resume that restored only the step count would end elsewhere
    first = load_checkpoint_file(straight_folder / "checkpoints" / "epoch=0-step=1.ckpt")["state_dict"]
    assert any(not torch.equal(first[name], tensor) for name, tensor in b["state_dict"].items())


def test_qlora_export_adapter_and_merged_model(qlora_run, tiny_model, tmp_path):
    folder, recipe, module = qlora_run
    written = export(recipe, folder / "checkpoints" / "last.ckpt", tmp_path / "export", dtype="float32")
    assert set(written) == {"adapter", "model"}
    assert "not in 4 bits" in (written["model"] / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), written["adapter"]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        merged_logits, adapter_logits = merged(ids).logits, with_adapter(ids).logits
        plain_logits = plain(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=0, atol=1e-4)
    assert (merged_logits - plain_logits).abs().max() > 1e-3  # the update survived the merge
    saved = policy_weights(folder / "checkpoints" / "last.ckpt")
    adapter_state = with_adapter.state_dict()
    for name, tensor in saved.items():
        torch.testing.assert_close(adapter_state[name], tensor, rtol=0, atol=0, msg=name)
    assert (written["model"] / "tokenizer.json").is_file() and (written["adapter"] / "adapter_config.json").is_file()


def test_export_command_writes_a_bf16_merged_model(qlora_run, tiny_model, tmp_path):
    """``python -m relax_pl export`` as the README shows it (bf16 by default): a bf16 model that is closer to the
    trained policy (the 4-bit base with the adapter) than the base is: the update survived the merge."""
    folder, recipe, _ = qlora_run
    out = tmp_path / "export"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "relax_pl", "export", "--config", str(recipe),
         "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"), "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["adapter:", str(out / "adapter"), "model:", str(out / "model")]
    assert "reloaded in bfloat16" in (out / "model" / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(out / "model", dtype="auto").eval()
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), out / "adapter").eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        target = trained(ids).logits
        merged_error = (merged(ids).logits.float() - target).abs().mean()
        base_error = (plain(ids).logits - target).abs().mean()
    assert merged_error < base_error / 4, (float(merged_error), float(base_error))


# ------------------------------------------------------------------------------------------------ LoRA
@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model):
    folder = tmp_path_factory.mktemp("lora")
    recipe = write_recipe(folder, tiny_model, {"class_path": "relax_pl.setups.LoRA", "init_args": LORA})
    cli = main(["fit", "--config", str(recipe)])
    return folder, recipe, cli.model


def test_lora_trains_an_adapter_on_the_unquantised_base_whose_reference_is_the_base(lora_run, tiny_model):
    import bitsandbytes as bnb

    folder, _, module = lora_run
    policy = module.policy.eval()
    assert isinstance(policy, PeftModel) and module._reference[0] is None
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.abs().max() > 0 for n, p in policy.named_parameters() if "lora_B" in n)  # B starts at zero
    base = load_causal_lm(str(tiny_model), dtype="float32").eval()
    base_state = base.state_dict()
    for name, tensor in policy.get_base_model().state_dict().items():
        if "lora_" not in name:  # the float32 base is the checkpoint's, untouched
            torch.testing.assert_close(tensor, base_state[name.replace(".base_layer", "")], rtol=0, atol=0, msg=name)
    rollout = module.generate([module.trainer.datamodule.train_data[i] for i in range(2)])
    reference, context = module.model_setup.reference(policy, module._reference[0])
    with context:
        ref_logp = module.response_forward.logprobs(reference, rollout)
    base_logp = module.response_forward.logprobs(base, rollout)
    policy_logp = module.response_forward.logprobs(policy, rollout)
    mask = rollout.response_mask
    torch.testing.assert_close(ref_logp[mask], base_logp[mask], rtol=0, atol=1e-6)
    assert (policy_logp[mask] - base_logp[mask]).abs().max() > 1e-3

    keys = set(load_checkpoint_file(folder / "checkpoints" / "last.ckpt")["state_dict"])
    assert keys == {f"policy.{n}" for n in trainable}  # the adapter only


def test_lora_export_merges_exactly(lora_run, tiny_model, tmp_path):
    folder, recipe, _ = lora_run
    written = export(recipe, folder / "checkpoints" / "last.ckpt", tmp_path / "export", dtype="float32")
    assert set(written) == {"adapter", "model"} and not (written["model"] / "README.md").exists()
    merged = AutoModelForCausalLM.from_pretrained(written["model"]).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), written["adapter"]).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=0, atol=1e-5)


def test_paged_adamw_8bit_steps_the_adapter(tmp_path, tiny_model):
    import bitsandbytes as bnb

    recipe = write_recipe(tmp_path, tiny_model, qlora_setup(), max_steps=1, optimizer={"name": "paged_adamw_8bit", "lr": 1e-2})
    cli = main(["fit", "--config", str(recipe)])
    assert type(cli.trainer.optimizers[0]) is bnb.optim.PagedAdamW8bit
    assert all(p.abs().max() > 0 for n, p in cli.model.policy.named_parameters() if "lora_B" in n)


def test_adamw_8bit_keeps_8bit_state(tmp_path, tiny_model):
    """The 8-bit optimiser is the one that steps, and its moments are 8-bit (bitsandbytes keeps tensors under
    4096 elements, such as the tiny model's biases and LoRA matrices, in 32 bits)."""
    import bitsandbytes as bnb

    recipe = write_recipe(tmp_path, tiny_model, {"class_path": "relax_pl.setups.SingleDevice"}, max_steps=1,
                          optimizer={"name": "adamw_8bit", "lr": 1e-2})
    cli = main(["fit", "--config", str(recipe)])
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer) is bnb.optim.AdamW8bit
    large = [p for p in cli.model.policy.parameters() if p.numel() >= 4096]
    assert large and all(optimizer.state[p]["state1"].dtype == torch.uint8 for p in large)
    assert all(optimizer.state[p]["state2"].dtype == torch.uint8 for p in large)
    saved = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"]
    quantised = [state["__bnb_optimizer_quant_state__"] for state in saved.values()]  # bitsandbytes' own key
    assert sum(q["state1"].dtype == torch.uint8 for q in quantised) == len(large)  # and so in the checkpoint
    assert moved_weights(policy_weights(tmp_path / "checkpoints" / "last.ckpt"), tiny_model)


def test_lora_target_that_matches_nothing_names_the_layers(tiny_model):
    model = load_causal_lm(str(tiny_model))
    with pytest.raises(ValueError, match=r"'qproj' matches no linear layer.*'q_proj'"):
        QLoRA(target_modules=["q_proj", "qproj"]).lora_config(model)
    with pytest.raises(ValueError, match="'up_proj' matches no linear layer"):  # every up_proj is excluded
        QLoRA(target_modules=["up_proj"], exclude_modules=["mlp"]).lora_config(model)
    wrapped = get_peft_model(model, QLoRA(target_modules="all-linear", exclude_modules=["mlp"]).lora_config(model))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj"}  # nothing under the excluded mlp, not the head


def test_impossible_combinations_fail_early(tmp_path, tiny_model, capsys):
    recipe = write_recipe(tmp_path / "q", tiny_model, qlora_setup())
    with pytest.raises(ValueError, match=r"trainer.devices='?2'? conflicts with model.setup \(QLoRA uses 1\)"):
        main(["fit", "--config", str(recipe), "--trainer.devices", "2"])
    recipe = write_recipe(tmp_path / "f", tiny_model, {"class_path": "relax_pl.setups.FSDP"})
    environ = dict(os.environ)
    try:
        with pytest.raises(ValueError, match="FSDP on one CPU process shards nothing"):
            main(["fit", "--config", str(recipe), "--trainer.devices", "1"])
    finally:  # the strategy set MASTER_PORT and holds a process group: neither may leak into later tests
        os.environ.clear()
        os.environ.update(environ)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    recipe = write_recipe(tmp_path / "s", tiny_model, {"class_path": "relax_pl.setups.SingleDevice"})
    with pytest.raises(ValueError, match=r"trainer.strategy='ddp' conflicts with model.setup \(SingleDevice uses 'auto'\)"):
        main(["fit", "--config", str(recipe), "--trainer.strategy", "ddp"])
    assert isinstance(SingleDevice().trainer_overrides()["devices"], int)
    assert FSDP().trainer_overrides()["strategy"].__class__.__name__ == "ShardedDataParallel"


# ------------------------------------------------------------------------------------------------ FSDP
def fsdp_fit(
    folder: Path, model: Path, max_steps: int, ckpt_path: str | None = None, callbacks: list[dict] = (), **model_keys
) -> Path:
    recipe = write_recipe(
        folder,
        model,
        {"class_path": "relax_pl.setups.FSDP", "init_args": {"gradient_checkpointing": True}},
        max_steps=max_steps,
        callbacks=[{"class_path": "probes.ShardProbe", "init_args": {"out": str(folder / "probe")}}, *callbacks],
        sampling={"num_responses": 4, "max_new_tokens": 16, "temperature": 1.0},
        **model_keys,
    )
    command = [sys.executable, "-m", "relax_pl", "fit", "--config", str(recipe),
               "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    if ckpt_path is not None:
        command += ["--ckpt_path", ckpt_path]
    launcher_vars = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-5000:]
    return recipe


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, early_stopping_model):
    folder = tmp_path_factory.mktemp("fsdp")
    recipe = fsdp_fit(folder, early_stopping_model, max_steps=2)
    probes = [json.loads((folder / "probe" / f"rank{r}.json").read_text()) for r in range(2)]
    return folder, recipe, probes


def test_fsdp_shards_every_block_across_two_processes(fsdp_run):
    _, _, probes = fsdp_run
    assert [p["rank"] for p in probes] == [0, 1] and probes[0]["world_size"] == 2
    for model in ("policy", "reference"):
        # fully_shard per decoder block, then the root (root-only sharding would gather the whole model at once)
        assert probes[0]["fsdp_units"][model] == ["", "model.layers.0", "model.layers.1"], probes[0]["fsdp_units"]
        shapes = [p[model] for p in probes]
        block_params = [n for n in shapes[0] if ".layers." in n]
        assert len(block_params) >= 2 * 9  # 2 decoder blocks, each sharded
        for name, shape in shapes[0].items():
            assert "local" in shape, f"{model} parameter {name} is not sharded"
            global_rows = shape["global"][0]
            local_rows = [s[name]["local"][0] for s in shapes]
            assert sum(local_rows) == global_rows and max(local_rows) < global_rows, (model, name, local_rows)


def test_fsdp_ranks_generate_whole_groups_of_different_lengths(fsdp_run):
    _, _, probes = fsdp_run
    steps = [p["steps"] for p in probes]
    assert len(steps[0]) == len(steps[1]) == 2
    for rank_steps in steps:
        for step in rank_steps:
            size = step["group_size"]
            groups = [step["rows"][i : i + size] for i in range(0, len(step["rows"]), size)]
            assert all(len(set(g)) == 1 for g in groups)  # a group's responses share their prompt
            assert step["advantages_match"]  # advantages normalised within this rank's own groups
            assert len(set(step["rewards"])) > 1  # and they were not all zero
    for a, b in zip(*steps):
        assert not set(a["rows"]) & set(b["rows"])  # the ranks sampled different prompts
    # generation stayed in lockstep although the ranks finished at different steps
    assert any(a["width"] != b["width"] for a, b in zip(*steps)), [(a["width"], b["width"]) for a, b in zip(*steps)]
    assert any(len(set(s["lengths"])) > 1 for s in steps[0])


@pytest.mark.slow
def test_fsdp_latent_callbacks_with_split_groups_and_ranks_of_different_short_responses(
    tmp_path, early_stopping_model
):
    """ReLaX with groups of 4 split into micro-batches of 2, beside effective-rank shaping, on two FSDP ranks whose
    responses are too short for a DSD in different numbers: every sharded forward pairs up across the ranks (the run
    ends instead of hanging), the DSDs measured ahead (step 1: a look-ahead forward, padded to the other rank's
    count; step 2: the shared read) equal the update's, and both ranks keep the same effective-rank averages."""
    latent = [
        {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": 2, "steps": 5, "lr": 1e-3}},
        {"class_path": "relax_pl.callbacks.LatentExploration",
         "init_args": {"alpha": 1.0, "n_min": 3, "kl_coef": 0.01}},
        {"class_path": "relax_pl.callbacks.EffectiveRankShaping", "init_args": {"stride": 2, "max_tokens": 16}},
        {"class_path": "probes.LatentStateProbe", "init_args": {"out": str(tmp_path / "probe")}},
    ]
    fsdp_fit(tmp_path, early_stopping_model, max_steps=2, callbacks=latent, update={"micro_batch_size": 2})
    shards = [json.loads((tmp_path / "probe" / f"rank{r}.json").read_text())["steps"] for r in range(2)]
    latent_steps = [json.loads((tmp_path / "probe" / f"latent{r}.json").read_text()) for r in range(2)]
    short = [[sum(length < 4 for length in step["lengths"]) for step in steps] for steps in shards]  # < n_min + 1
    assert short[0] != short[1], short  # the case under test: the ranks have different numbers without a DSD
    valid = [[step["valid"] for step in steps] for steps in latent_steps]
    assert all(v > 0 for rank in valid for v in rank) and valid[0] != valid[1], valid
    for rank in latent_steps:
        assert all(step["lookahead_gap"] is not None and step["lookahead_gap"] < 1e-5 for step in rank), rank
        assert rank[0]["forward_ahead"] > 0 and rank[1]["forward_ahead"] == 0  # step 2 read them in the shared forward
    assert [s["er_reference"] for s in latent_steps[0]] == [s["er_reference"] for s in latent_steps[1]]


def test_fsdp_resume_from_sharded_checkpoint_is_exact(fsdp_run, tmp_path, early_stopping_model):
    folder, _, _ = fsdp_run
    first = folder / "checkpoints" / "epoch=0-step=1.ckpt"
    assert first.is_dir() and (first / ".metadata").is_file()  # one shard file per rank
    assert len(list(first.glob("*.distcp"))) == 2
    fsdp_fit(tmp_path, early_stopping_model, max_steps=2, ckpt_path=str(first))
    straight = load_policy_state(folder / "checkpoints" / "epoch=0-step=2.ckpt")
    resumed = load_policy_state(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt")
    initial = load_policy_state(first)
    assert straight.keys() == resumed.keys()
    for name, tensor in straight.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(initial[n], straight[n]) for n in straight)  # the resumed step trained


def test_fsdp_export_consolidates_a_hugging_face_folder(fsdp_run, tmp_path, early_stopping_model):
    folder, recipe, _ = fsdp_run
    written = export(recipe, folder / "checkpoints" / "last.ckpt", tmp_path / "export", dtype="float32")
    assert set(written) == {"model"}
    exported = AutoModelForCausalLM.from_pretrained(written["model"]).state_dict()
    trained = load_policy_state(folder / "checkpoints" / "last.ckpt")
    initial = AutoModelForCausalLM.from_pretrained(early_stopping_model).state_dict()
    for name, tensor in trained.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0, msg=name)
    assert any(not torch.equal(initial[n], exported[n]) for n in trained)


def test_fsdp_evaluate_shards_prompts_and_gathers_them(fsdp_run, tmp_path):
    """``python -m relax_pl evaluate`` over two processes: each samples its share of the prompts with the sharded
    checkpoint; the first writes every prompt once."""
    folder, recipe, _ = fsdp_run
    command = [sys.executable, "-m", "relax_pl", "evaluate", "--config", str(recipe),
               "--ckpt_path", str(folder / "checkpoints" / "last.ckpt"), "--num_samples", "2", "--max_prompts", "5",
               "--out", str(tmp_path), "--data.val_source", "builtin:arithmetic", "--data.val_batch_size", "2",
               "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    launcher_vars = {"MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in launcher_vars}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(command, env=env, capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-5000:]
    [entry] = json.loads((tmp_path / "evaluation.json").read_text())["checkpoints"]
    assert entry["rows"] == [0, 1, 2, 3, 4] and entry["step"] == 2  # 3 + 2 prompts, each once, in order
    assert json.loads((tmp_path / "evaluation.json").read_text())["settings"]["devices"] == 2
    assert all(len(values) == 5 for values in entry["per_prompt"].values())
