"""Export a training checkpoint as Hugging Face folders.

    python -m relax_pl export --config recipes/quickstart_qlora.yaml \\
        --ckpt_path runs/quickstart_qlora/checkpoints/last.ckpt --out exported/quickstart_qlora

The recipe's ``model:`` section says which base model and which setup wrote the checkpoint (and its ``imports:``
are imported first). Writes, in ``--dtype`` (bfloat16 by default, so a float32 run is downcast; ``--dtype float32``
keeps it):

* ``<out>/model``: a plain Hugging Face model and its tokenizer (``AutoModelForCausalLM.from_pretrained``). For a
  LoRA or QLoRA run it is the adapter merged into the base (for QLoRA, the base reloaded in bf16: see
  :data:`MERGE_NOTE`).
* ``<out>/adapter`` (LoRA and QLoRA runs only): the PEFT adapter and the tokenizer
  (``PeftModel.from_pretrained(base, "<out>/adapter")``).

Works for single-file checkpoints (SingleDevice, LoRA, QLoRA, FSDP with ``save_distributed_checkpoint: false``) and
for FSDP's sharded checkpoint folders, which are consolidated in this one process without a process group.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from jsonargparse import ArgumentParser
from torch import Tensor, nn

from relax_pl.checkpointing import CheckpointError, load_checkpoint_file, load_sharded_keys
from relax_pl.extension import import_modules
from relax_pl.models import load_causal_lm, load_tokenizer
from relax_pl.module import RLVRModule
from relax_pl.setups import LoRA, QLoRA

MERGE_NOTE = """\
This folder holds the base model with the LoRA adapter merged in. The base was reloaded in {dtype} from
{pretrained}, not in 4 bits: merging into 4-bit weights re-quantises them, and the small LoRA update is lost in
that rounding. The adapter was trained against the NF4-quantised base, so this merged model differs from the
trained policy by the base's quantisation error; for exactly the trained policy, load the 4-bit base and the
adapter in ../adapter with PeftModel.from_pretrained.
"""


def module_from_recipe(config: str | Path) -> RLVRModule:
    """The RLVRModule a recipe describes (no weights are loaded: the module builds its models lazily)."""
    recipe = yaml.safe_load(Path(config).read_text())
    if not isinstance(recipe, dict) or "model" not in recipe:
        raise ValueError(f"recipe {str(config)!r} has no model: section")
    import_modules(recipe.get("imports") or [])  # a model family adapter the run used
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(RLVRModule, "model", fail_untyped=False)
    parsed = parser.parse_object({"model": recipe["model"]})
    return parser.instantiate_classes(parsed).model


def load_policy_state(ckpt_path: str | Path) -> dict[str, Tensor]:
    """The policy's tensors in a checkpoint, keyed as in the policy (the module's ``policy.`` prefix removed).

    A folder is a sharded (distributed) checkpoint and is consolidated here; a file is a Lightning checkpoint.
    Either is read as tensors and plain data only (:mod:`relax_pl.checkpointing`): one whose pickle carries code is
    refused with a :class:`~relax_pl.checkpointing.CheckpointError` naming the file.
    """
    path = Path(ckpt_path)
    if path.is_dir():
        if not (path / ".metadata").is_file():
            raise FileNotFoundError(f"checkpoint folder {str(path)!r} has no .metadata: not a sharded checkpoint")
        # Reads only the model entry (not the optimiser state) into this process, without a process group.
        state = load_sharded_keys({"state_dict"}, path)["state_dict"]
    else:  # tensors and plain data only: a shared checkpoint cannot run code here
        checkpoint = load_checkpoint_file(path, mmap=True)
        if "state_dict" not in checkpoint:
            raise ValueError(f"checkpoint {str(path)!r} has no state_dict: not a Lightning checkpoint")
        state = checkpoint["state_dict"]
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise ValueError(f"checkpoint {str(path)!r} holds no policy weights (no state_dict key starts with 'policy.')")
    return policy


def load_full_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load every weight of ``model`` from ``state``; a tied weight may be saved under one of its names only."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    current = model.state_dict()
    loaded = {current[k].data_ptr() for k in state if k in current}
    missing = [k for k in missing if current[k].data_ptr() not in loaded]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source!r} does not match {type(model).__name__}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; export with the recipe that wrote it"
        )


def load_adapter_state(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load the LoRA tensors of a LoRA or QLoRA checkpoint into a PEFT model built with the same LoRA settings."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "lora_" in k]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {source!r} does not hold this adapter: missing {missing[:5]}, unexpected {unexpected[:5]};"
            " export with the recipe (model.pretrained and model.setup) that wrote it"
        )


def export(config: str | Path, ckpt_path: str | Path, out: str | Path, dtype: str = "bfloat16") -> dict[str, Path]:
    """Write ``<out>/model`` (and ``<out>/adapter`` for LoRA and QLoRA runs); returns the folders written."""
    module = module_from_recipe(config)
    state = load_policy_state(ckpt_path)
    out = Path(out)
    tokenizer = load_tokenizer(
        module.pretrained, trust_remote_code=module.trust_remote_code, chat_template=module.chat_template
    )
    model = load_causal_lm(module.pretrained, dtype=dtype, trust_remote_code=module.trust_remote_code)
    written: dict[str, Path] = {}
    if isinstance(module.model_setup, LoRA):
        from peft import get_peft_model

        peft_model = get_peft_model(model, module.model_setup.lora_config(model))
        load_adapter_state(peft_model, state, str(ckpt_path))
        written["adapter"] = out / "adapter"
        peft_model.save_pretrained(written["adapter"])
        tokenizer.save_pretrained(written["adapter"])
        model = peft_model.merge_and_unload()
    else:
        load_full_state(model, state, str(ckpt_path))
    written["model"] = out / "model"
    model.save_pretrained(written["model"])
    tokenizer.save_pretrained(written["model"])
    if isinstance(module.model_setup, QLoRA):  # an unquantised base merges exactly (up to the dtype)
        (written["model"] / "README.md").write_text(MERGE_NOTE.format(dtype=dtype, pretrained=module.pretrained))
    return written


def main(args: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m relax_pl export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="the recipe the checkpoint was trained with")
    parser.add_argument("--ckpt_path", required=True, help="a .ckpt file or a sharded checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to write model/ (and adapter/) into")
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
        help="the weights' dtype in the written folders (default: bfloat16, so a float32 run is downcast)",
    )
    parsed = parser.parse_args(args)
    try:
        written = export(parsed.config, parsed.ckpt_path, parsed.out, parsed.dtype)
    except (CheckpointError, FileNotFoundError) as error:  # the message names the file and what to do
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    for kind, folder in written.items():
        print(f"{kind}: {folder}")
    return written


if __name__ == "__main__":
    main()
