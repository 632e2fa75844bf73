"""Hardware layouts. A setup builds the policy and the reference policy and names the Lightning strategy and
precision that go with them, so a recipe says it once (``model.setup``) and the Trainer follows.

* :class:`SingleDevice`: the whole model on one device, full fine-tuning, a full copy as reference.
* :class:`LoRA`: a frozen bf16 / float32 base with a LoRA adapter on one device; the reference is the same model
  with the adapter disabled, and checkpoints hold the adapter only.
* :class:`QLoRA`: the same on a 4-bit NF4 base, for a model that does not fit unquantised.
* :class:`FSDP`: full fine-tuning sharded over every rank with FSDP2 (``fully_shard`` per decoder block, then the
  root) through Lightning's ``ModelParallelStrategy``; runs on GPUs, and on CPUs with several processes.

Example recipe fragment::

    model:
      setup:
        class_path: relax_pl.setups.QLoRA
        init_args: {dtype: bfloat16, rank: 16, alpha: 32}
"""

from __future__ import annotations

import copy
import re
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Literal

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from relax_pl.families import family_of
from relax_pl.models import load_causal_lm

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

Dtype = Literal["float32", "bfloat16", "float16", "float64"]  # float64: for numerical checks
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass(frozen=True)
class RunLayout:
    """What a setup is checked against (:meth:`Setup.check`): the trainer's processes and strategy, and the recipe
    values that constrain a layout."""

    world_size: int = 1
    device: torch.device = torch.device("cpu")  # this process's (the strategy's root device)
    strategy: Strategy | None = None  # None: no trainer (a module built by hand)
    dynamic_sampling: bool = False  # model.update.dynamic_sampling


class Setup:
    """Base class: how to build the models and which Trainer strategy/precision runs them.

    The module calls, in order: :meth:`check` (before any weights are read), :meth:`build_policy`,
    :meth:`build_reference`, :meth:`parallelize`; then :meth:`reference` on every step that needs reference
    log-probs, and :meth:`checkpoint_state_dict` / :meth:`check_checkpoint` when saving and resuming.
    """

    strict_loading: bool = True  # a checkpoint holds every weight of the module
    # Every forward of the policy is a collective over the ranks (a sharded model): the ranks must generate in
    # lockstep (the same decoding steps), run the same forwards in the same order, and each grad forward must be
    # followed by its own backward. The module and the rollout engines read this instead of guessing from the mesh.
    lockstep: bool = False

    def __init__(self, dtype: Dtype = "float32", gradient_checkpointing: bool = False) -> None:
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing

    def check(self, layout: RunLayout) -> None:
        """Raise on settings this layout cannot run, naming what to change (called before loading weights)."""

    def forward_dtype(self, device: torch.device) -> str:
        """The dtype the policy's forward computes in on ``device``."""
        return self.dtype

    def build_policy(self, pretrained: str, trust_remote_code: bool = False, device: torch.device | None = None) -> nn.Module:
        policy = load_causal_lm(pretrained, dtype=self.dtype, trust_remote_code=trust_remote_code)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(policy)
        return policy

    def build_reference(self, policy: nn.Module) -> nn.Module | None:
        """A frozen reference policy, or None when the policy itself can act as one (see ``reference``)."""
        return copy.deepcopy(policy).eval().requires_grad_(False)

    def parallelize(self, policy: nn.Module, reference: nn.Module | None, device_mesh: DeviceMesh | None) -> None:
        """Shard the built models over the strategy's device mesh (nothing to do on one device)."""

    def reference(self, policy: nn.Module, built: nn.Module | None) -> tuple[nn.Module, AbstractContextManager]:
        """The model to run for reference log-probs and the context to run it in."""
        return built, nullcontext()

    def generation(self, policy: nn.Module) -> AbstractContextManager:
        """The context the policy generates in."""
        return nullcontext()

    def checkpoint_state_dict(self, policy: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The part of the module's state dict that a checkpoint keeps (all of it by default)."""
        return state_dict

    def check_checkpoint(self, policy: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Raise when a checkpoint cannot be resumed into this layout (before any tensor is loaded)."""

    def trainer_overrides(self) -> dict:
        """Trainer arguments this setup decides (strategy, precision, devices)."""
        return {}


class SingleDevice(Setup):
    """The whole policy on one device (CPU or one GPU), full fine-tuning, a full copy as reference.

    Args:
        dtype: weights' dtype. float32 on the CPU; bfloat16 on a GPU.
        gradient_checkpointing: recompute decoder activations in backward to save memory.
    """

    def trainer_overrides(self) -> dict:
        return {"strategy": "auto", "devices": 1}


class LoRA(Setup):
    """A frozen base in its own dtype (bfloat16 or float32, nothing quantised) with a trainable LoRA adapter, on one
    device: for a model that fits unquantised, where QLoRA's 4-bit layers would only cost time (on a CPU, minutes
    per step) and add quantisation error.

    The reference policy is the policy with its adapter disabled, so no second copy is held. Checkpoints hold
    the adapter and the optimiser state only; ``python -m relax_pl export`` writes the adapter folder and the
    base with the adapter merged in.

    Args:
        dtype: the base's dtype: bfloat16 on a GPU, float32 on the CPU. The adapter's weights are kept in float32
            whatever the base's (PEFT upcasts them) for stable updates.
        gradient_checkpointing: recompute decoder activations in backward (works with the frozen base: the
            embedding output is made to require grad).
        rank: LoRA rank ``r``.
        alpha: LoRA scaling numerator (the update is ``alpha / rank * B A``).
        dropout: dropout on the adapter's input.
        target_modules: ``"all-linear"`` (every linear layer but the output head) or names such as
            ``["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]``.
        exclude_modules: module names whose linear layers get no adapter, wherever they sit (default: the
            vision tower of vision-language models, ``visual`` in Qwen2-VL / Qwen2.5-VL).
    """

    strict_loading = False  # a checkpoint holds the adapter only; check_checkpoint verifies it is complete

    def __init__(
        self,
        dtype: Dtype = "float32",
        gradient_checkpointing: bool = False,
        rank: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: list[str] = ["visual"],  # noqa: B006 (jsonargparse shows the default in the schema)
    ) -> None:
        super().__init__(dtype, gradient_checkpointing)
        if rank < 1:
            raise ValueError(f"model.setup.rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"model.setup.dropout must be in [0, 1), got {dropout}")
        if isinstance(target_modules, str) and target_modules != "all-linear":
            target_modules = [target_modules]
        self.rank, self.alpha, self.dropout = rank, alpha, dropout
        self.target_modules = target_modules
        self.exclude_modules = list(exclude_modules)

    def check(self, layout: RunLayout) -> None:
        world_size = layout.world_size
        if world_size > 1:
            raise ValueError(
                f"model.setup {type(self).__name__} runs on one device, but the trainer has {world_size} processes; "
                "set trainer.devices: 1 and trainer.num_nodes: 1, or use relax_pl.setups.FSDP to train on several"
            )

    def lora_config(self, model: nn.Module):
        """The PEFT ``LoraConfig`` for ``model``, after checking that every target matches a linear layer."""
        from peft import LoraConfig

        check_lora_targets(model, self.target_modules, self.exclude_modules)
        excluded = [name for name, _ in model.named_modules() if excluded_by(name, self.exclude_modules)]
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            # PEFT warns when an exclusion matches nothing, so a text model gets none
            exclude_modules=exclusion_pattern(self.exclude_modules) if excluded else None,
            bias="none",
            task_type="CAUSAL_LM",
        )

    def build_policy(self, pretrained: str, trust_remote_code: bool = False, device: torch.device | None = None) -> nn.Module:
        from peft import get_peft_model

        base = load_causal_lm(pretrained, dtype=self.dtype, trust_remote_code=trust_remote_code)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(base)
            base.enable_input_require_grads()  # checkpointed blocks then see an input that carries grad
        return get_peft_model(base, self.lora_config(base))  # freezes every base parameter

    def build_reference(self, policy: nn.Module) -> None:
        return None

    def reference(self, policy: nn.Module, built: nn.Module | None) -> tuple[nn.Module, AbstractContextManager]:
        return policy, policy.disable_adapter()

    def checkpoint_state_dict(self, policy: nn.Module, state_dict: dict[str, Any]) -> dict[str, Any]:
        trainable = set(trainable_state_keys(policy))
        return {k: v for k, v in state_dict.items() if k in trainable or not k.startswith("policy.")}

    def check_checkpoint(self, policy: nn.Module, checkpoint: dict[str, Any]) -> None:
        saved = {k for k in checkpoint.get("state_dict", {}) if k.startswith("policy.")}
        expected = set(trainable_state_keys(policy))
        if saved != expected:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            raise ValueError(
                f"the checkpoint does not hold this {type(self).__name__} policy's adapter: {len(missing)} adapter "
                f"tensors missing (e.g. {missing[:3]}), {len(unexpected)} unexpected tensors (e.g. {unexpected[:3]}). "
                "Resume with the model.setup (rank, target_modules, exclude_modules) and model.pretrained that wrote it"
            )

    def trainer_overrides(self) -> dict:
        return {"strategy": "auto", "devices": 1}


class QLoRA(LoRA):
    """:class:`LoRA` on a 4-bit base (bitsandbytes NF4, double quantisation): for a model that does not fit in 16
    bits on one device. ``python -m relax_pl export`` merges the adapter into the base reloaded in bf16 (merging into
    4-bit weights would re-quantise them and lose most of the update).

    Args:
        dtype: compute dtype of the 4-bit layers (``bnb_4bit_compute_dtype``): bfloat16 on a GPU, float32 on the
            CPU. Norms, embeddings and the adapter are kept in float32 for stable updates.
        gradient_checkpointing, rank, alpha, dropout, target_modules, exclude_modules: as for :class:`LoRA`.
        quant_type: ``"nf4"`` (QLoRA's NormalFloat) or ``"fp4"``.
        double_quant: quantise the quantisation constants too (about 0.4 bits per weight saved).
    """

    def __init__(
        self,
        dtype: Dtype = "float32",
        gradient_checkpointing: bool = False,
        rank: int = 16,
        alpha: int = 32,
        dropout: float = 0.05,
        target_modules: str | list[str] = "all-linear",
        exclude_modules: list[str] = ["visual"],  # noqa: B006 (jsonargparse shows the default in the schema)
        quant_type: Literal["nf4", "fp4"] = "nf4",
        double_quant: bool = True,
    ) -> None:
        super().__init__(dtype, gradient_checkpointing, rank, alpha, dropout, target_modules, exclude_modules)
        self.quant_type, self.double_quant = quant_type, double_quant

    def quantization_config(self):
        from transformers import BitsAndBytesConfig

        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=DTYPES[self.dtype],
        )

    def build_policy(self, pretrained: str, trust_remote_code: bool = False, device: torch.device | None = None) -> nn.Module:
        from peft import get_peft_model, prepare_model_for_kbit_training

        # Quantise straight onto the GPU: a 7B model never exists in 16 bits on the host.
        placement = {"device_map": {"": device}} if device is not None and device.type == "cuda" else {}
        base = load_causal_lm(
            pretrained,
            dtype=self.dtype,
            trust_remote_code=trust_remote_code,
            quantization_config=self.quantization_config(),
            **placement,
        )
        # Freezes the base and upcasts the non-quantised parameters (norms, embeddings) to float32.
        base = prepare_model_for_kbit_training(
            base,
            use_gradient_checkpointing=self.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(base)
            base.enable_input_require_grads()  # checkpointed blocks then see an input that carries grad
        keep_cpu_weights_trainable(base)
        return get_peft_model(base, self.lora_config(base))


class FSDP(Setup):
    """Full fine-tuning sharded over all ranks with FSDP2: each decoder block (and vision block) is one
    ``fully_shard`` unit, the root holds the rest (embeddings, final norm, head). The reference policy is a
    frozen copy sharded the same way. Each rank samples whole prompt groups (the data sampler splits prompts,
    not responses), so advantages are computed per rank without communication.

    Runs under Lightning's ``ModelParallelStrategy`` with a one-dimensional mesh over every process (set
    ``trainer.devices`` and ``trainer.num_nodes``); on CPUs it needs at least two processes (gloo).

    Args:
        dtype: the sharded master weights' dtype (what the optimiser updates).
        gradient_checkpointing: recompute decoder activations in backward to save memory.
        compute_dtype: dtype the gathered weights are cast to for forward and backward; gradients are reduced
            in float32. ``"auto"``: bfloat16 on GPUs, float32 on CPUs.
        reshard_after_forward: free each block's gathered weights after its forward (ZeRO-3) instead of
            keeping them until its backward (faster, more memory).
        save_distributed_checkpoint: each rank writes its own shard into a checkpoint folder; False gathers
            one file on rank 0 (slower, needs the full model in host memory).
    """

    lockstep = True

    def __init__(
        self,
        dtype: Dtype = "float32",
        gradient_checkpointing: bool = False,
        compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
    ) -> None:
        super().__init__(dtype, gradient_checkpointing)
        self.compute_dtype = compute_dtype
        self.reshard_after_forward = reshard_after_forward
        self.save_distributed_checkpoint = save_distributed_checkpoint

    def check(self, layout: RunLayout) -> None:
        if not isinstance(layout.strategy, ShardedDataParallel):
            raise ValueError(
                f"model.setup FSDP needs the strategy it names, but the trainer runs {type(layout.strategy).__name__};"
                " remove trainer.strategy from the recipe (or build the Trainer with setup.trainer_overrides())"
            )
        if layout.world_size == 1 and layout.device.type == "cpu":
            raise ValueError(
                "model.setup FSDP on one CPU process shards nothing; use relax_pl.setups.SingleDevice, or run "
                "several processes: --trainer.accelerator cpu --trainer.devices 2"
            )
        if layout.world_size > 1 and layout.dynamic_sampling:
            raise ValueError(
                "model.update.dynamic_sampling with FSDP: ranks would keep different numbers of groups and run "
                "different numbers of sharded forward passes (a deadlock); set model.update.dynamic_sampling: false"
            )

    def parallelize(self, policy: nn.Module, reference: nn.Module | None, device_mesh: DeviceMesh | None) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if device_mesh is None:
            raise RuntimeError("FSDP.parallelize needs the device mesh of Lightning's ModelParallelStrategy")
        mesh = device_mesh["data_parallel"]
        compute = self.forward_dtype(torch.device(mesh.device_type))
        precision = MixedPrecisionPolicy(param_dtype=DTYPES[compute], reduce_dtype=torch.float32)
        for model in (policy, reference):
            if model is None:
                continue
            for block in family_of(model).decoder_blocks(model):
                fully_shard(block, mesh=mesh, mp_policy=precision, reshard_after_forward=self.reshard_after_forward)
            fully_shard(model, mesh=mesh, mp_policy=precision)

    def forward_dtype(self, device: torch.device) -> str:
        """``compute_dtype``, the dtype the gathered shards are cast to (``"auto"``: bfloat16 on GPUs, else float32)."""
        if self.compute_dtype != "auto":
            return self.compute_dtype
        return "bfloat16" if device.type == "cuda" else "float32"

    @contextmanager
    def generation(self, policy: nn.Module) -> Iterator[None]:
        """Gather each block's weights once and keep them for every decoding step (instead of one all-gather
        per block per generated token); they are freed when generation ends. Costs the policy's full size in
        ``compute_dtype`` per device while generating, about what a separate inference engine would hold."""
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in policy.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in units:  # the root keeps its weights gathered after forward, as fully_shard sets it
                unit.set_reshard_after_forward(self.reshard_after_forward and unit is not policy, recurse=False)
                unit.reshard()

    def trainer_overrides(self) -> dict:
        return {"strategy": ShardedDataParallel(save_distributed_checkpoint=self.save_distributed_checkpoint)}


class ShardedDataParallel(ModelParallelStrategy):
    """``ModelParallelStrategy`` whose mesh puts every process in one data-parallel (sharding) dimension.

    Lightning's default mesh is ``(num_nodes, devices per node)`` for 2-D FSDP + tensor parallelism; FSDP alone
    wants ``(world size, 1)`` so that the data sampler gives each rank its own prompts.
    """

    def __init__(self, save_distributed_checkpoint: bool = True) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=save_distributed_checkpoint)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Tensors and plain data only, sharded folders included (see :mod:`relax_pl.checkpointing`)."""
        from relax_pl.checkpointing import safe_sharded_loading

        with safe_sharded_loading():
            return super().load_checkpoint(checkpoint_path, weights_only=True)


def enable_gradient_checkpointing(model: nn.Module) -> None:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # generate() turns the cache back on through its own config


def keep_cpu_weights_trainable(model: nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weights into an inference-only layout the
    first time it runs in eval mode without grad (as generation does) and keeps them so; a training forward then
    fails (an in-place bias add on a leaf). Switch the repacking off: generation and training share the layers."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def excluded_by(name: str, exclude: list[str]) -> bool:
    """True when a component of the dotted module name is one of ``exclude`` (``model.visual.blocks.0`` is under ``visual``)."""
    return bool(set(name.split(".")) & set(exclude))


def exclusion_pattern(exclude: list[str]) -> str:
    """A regex that PEFT full-matches against module names: anything at or under a component named in ``exclude``."""
    alternatives = "|".join(re.escape(e) for e in exclude)
    return rf"(.*\.)?({alternatives})(\..*)?"


def check_lora_targets(model: nn.Module, target_modules: str | list[str], exclude: list[str]) -> None:
    """Raise when a LoRA target matches no linear layer (outside ``exclude`` and the output head), naming the
    linear layers that exist."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not head and not excluded_by(name, exclude)
    ]
    leaves = sorted({name.rsplit(".", 1)[-1] for name in linear})
    if not linear:
        raise ValueError(f"{type(model).__name__} has no linear layer outside model.setup.exclude_modules={exclude}")
    if target_modules == "all-linear":
        return
    for target in target_modules:
        if not any(name == target or name.endswith("." + target) for name in linear):
            raise ValueError(
                f"model.setup.target_modules entry {target!r} matches no linear layer of {type(model).__name__} "
                f"(outside exclude_modules={exclude}); its linear layers are named: {leaves}"
            )


def trainable_state_keys(policy: nn.Module) -> list[str]:
    """The module state-dict keys (``policy.``-prefixed) of the policy's trainable parameters."""
    return [f"policy.{name}" for name, p in policy.named_parameters() if p.requires_grad]
