"""Vision-language path: a tiny random Qwen2.5-VL with its processor, trained and validated through the CLI on the
built-in geometry figures; image tensors per prompt, image-token accounting, and what reaches the reward worker."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from transformers import Qwen2_5_VLProcessor

from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.cli import main
from relax_pl.data import DataError, PromptDataModule, build_messages, geometry
from relax_pl.data.tasks import GEOMETRY_PROBLEMS, geometry_answer, geometry_problems
from relax_pl.families import final_norm
from relax_pl.families.qwen2_vl import ImageTextProcessor, expand_image_tokens
from relax_pl.models import load_causal_lm
from relax_pl.module import RLVRModule
from relax_pl.rewards import reward_fields
from relax_pl.rollout import SamplingConfig
from relax_pl.testing import VL_CHAT_TEMPLATE, save_tiny_vl_model
from relax_pl.vision import VisionConfig

from probes import moved_weights, policy_weights, tensorboard_logs, tiny_recipe


SYSTEM = "Given the images and the question, please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    return save_tiny_vl_model(tmp_path_factory.mktemp("vl") / "qwen2_5_vl", kind="qwen2_5_vl", seed=0)


def write_recipe(folder: Path, pretrained: Path, **sections) -> Path:
    """Two GRPO steps with the ReLaX callbacks on the built-in geometry figures, validation after the second."""
    callbacks = [
        {"class_path": "relax_pl.callbacks.ImageSampleLogger", "init_args": {"every_n_steps": 1, "panel_size": 96}},
        {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": 4, "steps": 3, "batch_size": 8}},
        {
            "class_path": "relax_pl.callbacks.LatentExploration",
            "init_args": {"xi_mode": "quantile", "kl_coef": 0.01, "n_min": 5, "gate_positive_only": False},
        },
    ]
    model = {
        "reward": {"class_path": "relax_pl.rewards.Geo3kReward"},
        "sampling": {"num_responses": 4, "max_new_tokens": 12, "temperature": 1.0, "max_prompt_tokens": 160},
        # a random model earns no reward (zero advantages): the entropy bonus makes the steps move the weights
        "objective": {"entropy_coef": 0.01},
        "validation": {"num_responses": 3, "temperature": 1.0},
        "vision": {"max_pixels": 12544},  # a 224x224 figure becomes 112x112: 16 image tokens
        **sections.pop("model", {}),
    }
    data = {
        "train_source": "builtin:geometry",
        "val_source": "builtin:geometry",
        "task_options": {"num_samples": 8},
        "image_key": "images",
        "system_prompt": SYSTEM,
        "batch_size": 2,
        "val_batch_size": 2,
        **sections.pop("data", {}),
    }
    return tiny_recipe(
        folder, pretrained, callbacks, seed=5,
        trainer={"limit_val_batches": 1, "val_check_interval": 2},
        model=model, data=data, **sections,
    )


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory, tiny_vl):
    folder = tmp_path_factory.mktemp("vl_fit")
    recipe = write_recipe(folder, tiny_vl)
    cli = main(["fit", "--config", str(recipe)])
    return folder, recipe, cli.model


def test_two_step_fit_with_relax_callbacks_logs_and_validates(vl_run):
    folder, _, module = vl_run
    assert type(module.processor).__name__ in ("ImageTextProcessor", "Qwen2_5_VLProcessor")
    values, images = tensorboard_logs(folder)
    for tag in [
        "critic/score/mean", "actor/pg_loss", "actor/entropy", "timing_s/gen", "timing_s/ref", "timing_s/update",
        "koopman/fit_loss_final", "relax/valid_frac", "relax/dsd_mean", "relax/gated_kl_loss",
        "val/reward", "val/accuracy", "val/format", "val/accuracy/mean@3", "val/accuracy/pass@3",
        "val/accuracy/greedy", "val/accuracy/source/builtin_geometry",
    ]:
        assert tag in values, f"{tag} not logged; got {sorted(values)}"
    # 12-token responses of a random model rarely stop early: most have the n_min = 5 transitions DSD needs
    assert max(values["relax/valid_frac"]) > 0.5
    # the gate holds on all valid responses, so the reference ran over the gated ones (with their images)
    assert max(values["relax/gated_frac"]) > 0
    assert all(v == v for v in values["relax/dsd_mean"])  # not NaN: computed on valid responses
    assert 0 <= values["val/accuracy/mean@3"][0] <= values["val/accuracy/pass@3"][0] <= 1
    assert values["val/accuracy"][0] == pytest.approx(values["val/accuracy/mean@3"][0], abs=1e-6)
    assert "samples/images" in images
    assert moved_weights(policy_weights(folder / "checkpoints" / "last.ckpt"), module.pretrained)  # it trained


def geometry_batch(module: RLVRModule) -> list[dict]:
    """Two geometry prompts and a text-only one: rows with and without images in one batch."""
    data = module.trainer.datamodule.train_data
    question = "What is 2 + 3?"
    text_only = {**data[2], "images": None, "messages": build_messages(question, SYSTEM), "prompt": question}
    return [data[0], data[1], text_only]


def unpadded_forward(module: RLVRModule, rollout, row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and final-norm hidden states of one row's response from a forward without padding or batching:
    the row's own tokens, its own prompt's image, positions left to the model."""
    keep = rollout.attention_mask[row].bool()
    ids = rollout.input_ids[row][keep][None]
    prompt = int(rollout.attention_mask[row, : rollout.prompt_length].sum())
    extra = rollout.forward_inputs(torch.tensor([row]), rollout.input_ids.shape[1])
    if "mm_token_type_ids" in extra:
        extra["mm_token_type_ids"] = extra["mm_token_type_ids"][:, keep]
    captured = []
    handle = final_norm(module.policy).register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        logits = module.policy(input_ids=ids, use_cache=False, **extra).logits.float()
    handle.remove()
    logp = logits[0, prompt - 1 : -1].log_softmax(-1).gather(-1, ids[0, prompt:, None]).squeeze(-1)
    return logp, captured[0][0, prompt:]


def test_images_reach_every_forward_and_hidden_states_cover_responses_only(vl_run):
    _, _, module = vl_run
    module.policy.eval()  # no dropout: forwards must agree exactly
    torch.manual_seed(0)
    rollout = module.generate(geometry_batch(module))
    image_pad = module.policy.config.image_token_id
    assert not (rollout.responses == image_pad).any()  # vision placeholders are never sampled
    # images are stored once per prompt: 2 figures of 16 image tokens (64 patches each); the text row has none
    assert rollout.model_input_counts["image_grid_thw"] == [1, 1, 0]
    assert rollout.model_input_counts["pixel_values"] == [64, 64, 0]
    assert rollout.model_inputs["pixel_values"].shape[0] == 128
    assert (rollout.token_inputs["mm_token_type_ids"].sum(-1) == torch.tensor([16] * 4 + [16] * 4 + [0] * 4)).all()

    module.update.micro_batch_size = 12  # one micro-batch: rows with and without images together
    logp = module.response_forward.logprobs(module.policy, rollout)
    pairs = module.response_hidden_states(rollout)
    hidden = torch.cat([h for h, _ in pairs])
    mask = rollout.response_mask
    assert hidden.shape[:2] == mask.shape and hidden.shape[2] == module.policy.config.text_config.hidden_size
    for row in (0, 5, 10):  # image prompt 0, image prompt 1, the text-only prompt
        own_logp, own_hidden = unpadded_forward(module, rollout, row)
        length = int(mask[row].sum())
        torch.testing.assert_close(logp[row, :length], own_logp, rtol=0, atol=2e-5)
        torch.testing.assert_close(hidden[row, :length], own_hidden, rtol=0, atol=2e-5)
    # any subset of rows gathers its own prompts' images (the groups of prompt 1 alone, reordered)
    module.update.micro_batch_size = 3  # micro-batches across prompts
    subset = rollout.select(torch.tensor([9, 7, 6, 5, 4, 0]))
    torch.testing.assert_close(
        module.response_forward.logprobs(module.policy, subset)[:, : logp.shape[1]], logp[[9, 7, 6, 5, 4, 0]], rtol=0, atol=2e-5
    )
    # and the images matter: other pixels, other log-probs
    rollout.model_inputs["pixel_values"] = torch.zeros_like(rollout.model_inputs["pixel_values"])
    assert (module.response_forward.logprobs(module.policy, rollout)[:4] - logp[:4]).abs().max() > 1e-4
    module.policy.train()
    module.update.micro_batch_size = 4


def test_validate_evaluates_a_checkpoint_without_training(vl_run, tiny_vl):
    folder, recipe, trained = vl_run
    ckpt = folder / "checkpoints" / "last.ckpt"
    cli = main(["validate", "--config", str(recipe), "--ckpt_path", str(ckpt), "--trainer.logger", "false"])
    metrics = cli.trainer.callback_metrics
    for name in ("val/accuracy", "val/reward", "val/accuracy/mean@3", "val/accuracy/pass@3", "val/accuracy/greedy"):
        assert name in metrics, sorted(metrics)
    saved = load_checkpoint_file(ckpt)["state_dict"]
    state = cli.model.state_dict()
    assert cli.trainer.global_step == 0  # nothing trained
    for name in ("policy.lm_head.weight", "policy.model.visual.blocks.0.mlp.up_proj.weight"):
        torch.testing.assert_close(state[name], saved[name], rtol=0, atol=0)
    assert not torch.equal(load_causal_lm(str(tiny_vl)).lm_head.weight, saved["policy.lm_head.weight"])  # it trained


def long_prompt_data(folder: Path) -> Path:
    """A JSONL split of two rows: a small figure (4 image tokens) and a large one (64 image tokens)."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (56, 56), "white").save(folder / "small.png")
    Image.new("RGB", (448, 448), "white").save(folder / "large.png")
    rows = [
        {"problem": "Find y in <image> please.", "answer": "1", "images": ["small.png"]},
        {"problem": "Find y in <image> please.", "answer": "2", "images": ["large.png"]},
    ]
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_prompt_length_counts_image_tokens_and_long_prompts_skip_or_fail(tmp_path, tiny_vl):
    data = long_prompt_data(tmp_path / "data")
    module = RLVRModule(str(tiny_vl), vision=VisionConfig(max_pixels=64 * 28 * 28))
    module.load_processing()
    dm = PromptDataModule(str(data), val_source=str(data), image_key="images", system_prompt=SYSTEM)
    dm.setup("validate")
    samples = [dm.val_data[0], dm.val_data[1]]
    # the count made without processing pixels is the length of the processor's encoding
    for sample in samples:
        encoded = module.processor(text=[module.render_prompt(sample)], images=sample["images"], return_tensors="pt")
        assert module.prompt_tokens(sample) == encoded["input_ids"].shape[1]
    small, large = (module.prompt_tokens(s) for s in samples)
    assert large - small == 64 - 4
    # the placeholder is where the row has it: text, figure, text
    rendered = module.render_prompt(samples[1])
    assert "Find y in <|vision_start|><|image_pad|><|vision_end|> please." in rendered

    # "error": generation refuses the long row, naming it, before any image token could be cut off
    module.configure_model()
    module.sampling = SamplingConfig(num_responses=2, max_new_tokens=4, max_prompt_tokens=small)
    with pytest.raises(ValueError, match=rf"prompt of row 1 from '{data}' has {large} tokens \(64 of them image"):
        module.generate(samples)
    module.sampling = SamplingConfig(num_responses=2, max_new_tokens=4, max_prompt_tokens=large)
    assert len(module.generate(samples)) == 4

    # "skip": the long row is left out at setup, validation runs on the other one
    recipe = write_recipe(
        tmp_path / "run", tiny_vl,
        model={
            "pretrained": str(tiny_vl), "vision": {"max_pixels": 64 * 28 * 28}, "validation": {"num_responses": 1},
            "sampling": {"num_responses": 2, "max_new_tokens": 4, "max_prompt_tokens": small, "on_long_prompt": "skip"},
        },
        data={"train_source": str(data), "train_split": "test", "val_source": str(data), "image_key": "images",
              "system_prompt": SYSTEM, "batch_size": 1, "val_batch_size": 2},
    )
    with pytest.warns(UserWarning, match=r"left out 1 of 2 rows .* rows \[1\]"):
        cli = main(["validate", "--config", str(recipe), "--trainer.logger", "false", "--trainer.callbacks", "[]"])
    assert len(cli.datamodule.val_data) == 1 and cli.datamodule.val_data[0]["row"] == 0
    assert "val/reward" in cli.trainer.callback_metrics


def test_processor_matches_transformers_qwen2_5_vl_processor(tiny_vl):
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_vl)
    tokenizer.padding_side = "left"
    image_processor = AutoImageProcessor.from_pretrained(tiny_vl, max_pixels=16 * 28 * 28)
    ours = ImageTextProcessor(image_processor, tokenizer)
    # transformers' class needs torchvision to be built (for its video processor); its image-and-text call does
    # not, so it is built here without __init__ to compare outputs
    theirs = object.__new__(Qwen2_5_VLProcessor)
    theirs.image_processor, theirs.tokenizer, theirs.chat_template = image_processor, tokenizer, VL_CHAT_TEMPLATE
    theirs.image_token, theirs.video_token = "<|image_pad|>", "<|video_pad|>"
    theirs.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    theirs.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    texts = ["<|vision_start|><|image_pad|><|vision_end|>Find x.", "a b <|vision_start|><|image_pad|><|vision_end|> c"]
    images = [Image.new("RGB", (100, 60), "red"), Image.new("RGB", (40, 300), "blue")]
    expected = theirs(text=texts, images=images, return_tensors="pt", padding=True)
    got = ours(text=texts, images=images, return_tensors="pt", padding=True)
    assert set(got) == set(expected)
    for key in got:
        torch.testing.assert_close(torch.as_tensor(got[key]), torch.as_tensor(expected[key]), rtol=0, atol=0, msg=key)
    with pytest.raises(ValueError, match="hold 1 <|image_pad|> placeholders for 2 images"):
        expand_image_tokens(texts[:1], [4, 4])


def test_messages_put_images_where_the_prompt_has_them(tmp_path):
    assert build_messages("Find <image> x <image>", None, 2)[0]["content"] == [
        {"type": "text", "text": "Find "}, {"type": "image"}, {"type": "text", "text": " x "}, {"type": "image"},
    ]
    assert build_messages("Find x.", "sys", 1)[1]["content"] == [{"type": "image"}, {"type": "text", "text": "Find x."}]
    with pytest.raises(ValueError, match="holds 1 <image> placeholders for 2 images"):
        build_messages("<image> x", None, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "<image><image>", "answer": "1", "images": ["a.png"]}))
    with pytest.raises(DataError, match=r"row 0 \(line 1\): the prompt holds 2 <image> placeholders for 1 images"):
        PromptDataModule(str(tmp_path), image_key="images").setup("fit")


def test_geometry_task_answers_splits_and_figures():
    rows = geometry("test", num_samples=50, seed=3)
    assert rows == geometry("test", num_samples=50, seed=3)  # deterministic
    assert {r["kind"] for r in rows} == set(GEOMETRY_PROBLEMS)
    figures = {split: {(r["kind"], r["images"][0]) for r in geometry(split, 300)} for split in ("train", "test")}
    assert not figures["train"] & figures["test"]  # no figure in two splits
    assert geometry_answer("angle", (50, 60)) == "70"
    assert geometry_answer("hypotenuse", (6, 8, 10)) == "10" and geometry_answer("leg", (6, 8, 10)) == "8"
    assert geometry_answer("rectangle_area", (3, 7)) == "21" and geometry_answer("triangle_area", (3, 7)) == "10.5"
    assert all(a + b <= 150 for a, b in geometry_problems("angle"))
    assert all(p * p + q * q == r * r for p, q, r in geometry_problems("hypotenuse"))
    dm = PromptDataModule("builtin:geometry", image_key="images", task_options={"num_samples": 4, "image_size": 96})
    dm.setup("fit")
    sample = dm.train_data[0]
    assert sample["images"][0].size == (96, 96) and sample["messages"][0]["content"][0] == {"type": "image"}
    with pytest.raises(ValueError, match="no problem kind 'circle'"):
        geometry("train", problems=["circle"])


def test_reward_worker_gets_no_images():
    sample = {"prompt": "p", "answer": "1", "images": [Image.new("RGB", (512, 512))], "raw": b"\x89PNG" * 1000,
              "figure": {"bytes": b"x", "path": None}, "kind": "angle", "messages": [{"role": "user", "content": "p"}]}
    kept = reward_fields(sample)
    assert kept == {"prompt": "p", "answer": "1", "kind": "angle", "messages": sample["messages"]}
    assert len(pickle.dumps(kept)) < 300


def test_geo3k_recipes_parse_offline(capsys):
    for recipe in ("recipes/geo3k.yaml", "recipes/geo3k_qlora.yaml", "recipes/geometry_demo.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", recipe, "--print_config"])
        assert exit_info.value.code in (0, None), recipe
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["data"]["image_key"] == "images"
        assert printed["model"]["vision"]["max_pixels"] > 0
