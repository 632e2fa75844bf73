"""RLVRModule: one GRPO step, readable top to bottom (see ``training_step``)."""

from __future__ import annotations

import math
import random
import re
import resource
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Literal, NamedTuple

import lightning as L
import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor, nn
from torchmetrics.aggregation import MeanMetric

from relax_pl import objectives as obj
from relax_pl.correction import truncated_importance_weights
from relax_pl.extension import DetachedForward, LossTerms, MiniBatch, PolicyForward, rlvr_callbacks
from relax_pl.models import EMBEDDED_MODEL, final_norm, load_tokenizer
from relax_pl.rewards import BoundedScorer, MathReward, VerifiableReward
from relax_pl.rollout import CACHE_ARG, HFGenerate, RolloutBatch, RolloutEngine, SamplingConfig, shared_prefix_cache
from relax_pl.setups import Setup, SingleDevice
from relax_pl.vision import VisionConfig, image_token_count, is_vision_language, load_processor


@dataclass
class ObjectiveConfig:
    """The policy loss (recipe key ``model.objective``); docs/method.md sections 1 and 6.

    ``kl_cov`` needs more than one optimiser step per rollout (``update.ppo_epochs >= 2`` or several
    mini-batches): its penalty is zero while the policy is the one that sampled. Clip-Cov and KL-Cov choose their
    tokens over the whole mini-batch (one extra no-grad forward when it takes several micro-batches)."""

    policy_loss: Literal["ppo", "clip_cov", "kl_cov"] = "ppo"
    clip_low: float = 0.2
    clip_high: float = 0.2  # > clip_low is DAPO's clip-higher
    kl_coef: float = 0.0  # 0 skips the reference forward entirely
    kl_estimator: obj.KLEstimator = "k3"
    loss_agg: obj.LossAggregation = "token-mean"
    entropy_coef: float = 0.0  # entropy bonus: loss -= entropy_coef * entropy
    scale_advantages: bool = True  # divide by the group std (False: Dr. GRPO)
    clip_cov_ratio: float = 2e-4
    clip_cov_bounds: tuple[float, float] = (1.0, 5.0)
    kl_cov_ratio: float = 2e-3
    kl_cov_coef: float = 1.0


@dataclass
class UpdateConfig:
    """How the policy is updated on one step's rollout (recipe key ``model.update``)."""

    ppo_epochs: int = 1
    mini_batch_size: int | None = None  # responses per optimiser step; None: the whole rollout
    micro_batch_size: int = 8  # responses per forward/backward (gradient accumulation inside a mini-batch)
    grad_clip: float = 1.0
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal (DAPO) and log how many
    logprob_chunk_size: int = 1024  # positions per vocabulary-projection chunk


@dataclass
class OptimizerConfig:
    """AdamW (recipe key ``model.optimizer``). The 8-bit variants come from bitsandbytes."""

    name: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = "adamw"
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8


@dataclass
class ValidationConfig:
    """Validation sampling (recipe key ``model.validation``): ``num_responses`` (k) per prompt, greedy when
    temperature is 0. Logs ``val/accuracy`` (mean over all responses: mean@k), ``val/accuracy/mean@k``,
    ``val/accuracy/pass@k`` (a prompt passes when one of its k responses is right), ``val/accuracy/greedy`` and
    ``val/accuracy/source/<name>`` per data source (the row's ``data_source`` column, else its source)."""

    num_responses: int = 1
    temperature: float = 0.0
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens
    greedy: bool = True  # with temperature > 0, also decode one greedy response per prompt (val/accuracy/greedy)


class RLVRModule(L.LightningModule):
    """Owns the policy, the reference policy and the verifiable reward; runs GRPO with manual optimisation.

    Subclass it and override :meth:`compute_rewards` for rewards that need the whole batch or the model.
    Callbacks join the step through :mod:`relax_pl.extension`.

    Args:
        pretrained: hub id, local folder, ``.gguf`` file or ``embedded:smollm2-135m-instruct``.
        setup: the hardware layout (:mod:`relax_pl.setups`); decides the Trainer's strategy.
        reward: scores one response against its dataset row; bounded in wall time.
        rollout: the engine that samples the responses (:mod:`relax_pl.rollout`): the policy itself (``HFGenerate``,
            the default, or ``HFContinuousBatching``) or a vLLM engine beside it (``VLLM``).
        sampling, objective, update, optimizer, validation: see their dataclasses.
        vision: image resizing for vision-language models (Qwen2-VL, Qwen2.5-VL), whose prompts are encoded by
            the checkpoint's processor with each row's images; ignored for text-only models.
        chat_template: overrides the tokenizer's chat template (a Jinja string).
        trust_remote_code: passed to transformers; never set unless the recipe asks.
    """

    def __init__(
        self,
        pretrained: str = EMBEDDED_MODEL,
        setup: Setup = lazy_instance(SingleDevice),
        reward: VerifiableReward = lazy_instance(MathReward),
        rollout: RolloutEngine = lazy_instance(HFGenerate),
        sampling: SamplingConfig = SamplingConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        validation: ValidationConfig = ValidationConfig(),
        vision: VisionConfig = VisionConfig(),
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pretrained = pretrained
        self.model_setup = setup
        self.reward = reward
        self.rollout_engine = rollout
        self.sampling, self.objective, self.update = sampling, objective, update
        self.optimizer_config, self.validation, self.vision = optimizer, validation, vision
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self.processor = None  # vision-language models only
        self._reference: list[nn.Module | None] = [None]  # a list keeps it out of state_dict and .parameters()
        self._scorer: BoundedScorer | None = None
        self._reward_failures = 0  # over the run, kept in checkpoints
        self._skipped_updates = 0  # optimiser steps skipped for a non-finite gradient, over the run, kept too
        self._resumed_rng_states: dict[str, Any] | None = None  # set on resume, applied in on_train_start
        self._step_reward_failures = (0, 0)  # (timeouts, errors) of the latest scoring call
        self._skipped_long_prompts: int | None = None  # rows left out at setup (sampling.on_long_prompt: skip)
        self._val_metrics: dict[str, MeanMetric] = {}  # plain dict: never in state_dict, never sharded
        self._rng_before_validation: tuple[Tensor, list[Tensor]] | None = None  # restored after validation
        self._step_timer: PhaseTimer | None = None  # the running training step's

    # ----------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the models lazily: a bad recipe fails in the parser before any weights are read."""
        if self.policy is not None:
            return
        self.model_setup.check(self)
        self.load_processing()
        self.rollout_engine.check(self)
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.policy = self.model_setup.build_policy(
            self.pretrained, trust_remote_code=self.trust_remote_code, device=device
        )
        self.policy.train()  # from_pretrained returns eval mode, in which HF silently skips gradient checkpointing
        if self.needs_reference:
            self._reference[0] = self.model_setup.build_reference(self.policy)
        self.model_setup.parallelize(self.policy, self._reference[0], self.device_mesh)
        self.rollout_engine.setup(self)
        self.strict_loading = self.model_setup.strict_loading

    def load_processing(self) -> None:
        """The tokenizer and, for a vision-language checkpoint, its processor (no weights are read)."""
        if self.tokenizer is not None:
            return
        self.tokenizer = load_tokenizer(
            self.pretrained, trust_remote_code=self.trust_remote_code, chat_template=self.chat_template
        )
        if is_vision_language(self.pretrained, self.trust_remote_code):
            self.processor = load_processor(
                self.pretrained, self.tokenizer, self.vision.min_pixels, self.vision.max_pixels, self.trust_remote_code
            )

    @property
    def needs_reference(self) -> bool:
        callbacks = rlvr_callbacks(self.trainer) if self._trainer is not None else []
        return self.objective.kl_coef > 0 or any(cb.needs_reference for cb in callbacks)

    @property
    def reference_up_front(self) -> bool:
        """Whether the reference log-probs of every response are computed before the update. Otherwise
        (only callbacks need a reference) ``PolicyForward.reference_kl`` runs the reference over the rows they
        select. Sharded ranks always run it up front: their forwards must stay in lockstep."""
        return self.needs_reference and (self.objective.kl_coef > 0 or self.device_mesh is not None)

    def configure_optimizers(self):
        cfg = self.optimizer_config
        params = [p for p in self.policy.parameters() if p.requires_grad]
        kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, eps=cfg.eps)
        if cfg.name == "adamw":
            return torch.optim.AdamW(params, **kwargs)
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.PagedAdamW8bit if cfg.name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
        return optimizer_class(params, **kwargs)

    def on_fit_start(self) -> None:
        if self._reference[0] is not None:
            self._reference[0].to(self.device)

    def setup(self, stage: str) -> None:
        per_node = self.trainer.num_devices if self._trainer is not None else 1  # each its own scoring pool
        self._scorer = BoundedScorer(self.reward, processes_per_node=per_node)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit":
            self.check_update_plan(getattr(datamodule, "batch_size", None))
        if self.sampling.on_long_prompt == "skip" and hasattr(datamodule, "drop_long_prompts"):
            self.load_processing()
            limit = self.sampling.max_prompt_tokens
            self._skipped_long_prompts = datamodule.drop_long_prompts(self.prompt_tokens, limit)

    def check_update_plan(self, prompts_per_step: int | None) -> None:
        """Refuse update settings that would silently compute something else than asked (before any weights load)."""
        group, mini = self.sampling.num_responses, self.update.mini_batch_size
        if mini is not None and mini % group:
            raise ValueError(
                f"model.update.mini_batch_size={mini} is not a multiple of model.sampling.num_responses={group}: an "
                f"optimiser step must hold whole prompt groups (group-relative advantages, group-level callback terms)"
            )
        responses = None if prompts_per_step is None else prompts_per_step * group
        single_pass = self.update.ppo_epochs == 1 and (mini is None or (responses is not None and mini >= responses))
        if self.objective.policy_loss == "kl_cov" and single_pass:
            raise ValueError(
                f"model.objective.policy_loss=kl_cov does nothing here: with model.update.ppo_epochs=1 and "
                f"model.update.mini_batch_size={mini} (>= the {responses or 'whole rollout of'} responses per step) the "
                f"policy is updated once per rollout, so KL-Cov's penalty |logp - old_logp| and its gradient are 0 and "
                f"the run is plain policy gradient. Set model.update.ppo_epochs >= 2, or a mini_batch_size smaller than "
                f"the responses per step, or use policy_loss: clip_cov"
            )

    def prompt_tokens(self, sample: dict[str, Any]) -> int:
        """Tokens of the rendered prompt, each image counted at its size after resizing (no pixels are processed)."""
        tokens = len(self.tokenizer(self.render_prompt(sample), add_special_tokens=False)["input_ids"])
        for image in sample.get("images") or []:  # its one placeholder token becomes image_token_count tokens
            tokens += image_token_count(self.processor.image_processor, image) - 1
        return tokens

    def teardown(self, stage: str) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    # ----------------------------------------------------------------------------------------- one step
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        timer = self._step_timer = PhaseTimer(self.device)
        with timer("gen"):
            rollout = self.generate(batch)
        with timer("reward"):
            rollout.reward_components = self.compute_rewards(rollout)
        rollout.rewards = rollout.reward_components["overall"]
        rollout.advantages = obj.group_advantages(
            rollout.rewards, rollout.group_size, scale=self.objective.scale_advantages
        )
        metrics = self.rollout_metrics(rollout)
        if self.update.dynamic_sampling:
            rollout, metrics["data/dropped_groups"] = self.drop_uniform_groups(rollout)
        for callback in rlvr_callbacks(self.trainer):
            callback.on_rollout_end(self.trainer, self, rollout)
        if len(rollout):
            if not self.single_update_pass(len(rollout)):
                with timer("old"):
                    rollout.old_logp = self.sequence_logprobs(self.policy, rollout)
            if self.reference_up_front:
                rollout.ref_logp = self.reference_logprobs(rollout, torch.arange(len(rollout), device=self.device))
            with timer("update"):
                metrics.update(self.update_policy(rollout))
        metrics.update(timer.metrics(), **self.performance_metrics(rollout, timer))
        self.log("reward", metrics["critic/score/mean"], prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def generate(
        self, batch: list[dict[str, Any]], sampling: SamplingConfig | None = None, greedy: bool = False
    ) -> RolloutBatch:
        prompts = [self.render_prompt(sample) for sample in batch]
        return self.rollout_engine.generate(self, prompts, batch, sampling or self.sampling, greedy=greedy)

    def render_prompt(self, sample: dict[str, Any]) -> str:
        if sample.get("images") and self.processor is None:
            raise ValueError(
                f"row {sample.get('row')} from {sample.get('source')!r} has images, but model.pretrained="
                f"{self.pretrained!r} is a text-only model; use a vision-language model or remove data.image_key"
            )
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {self.pretrained!r} has no chat template; set model.chat_template in the recipe"
            )
        return self.tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)

    def compute_rewards(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        """Score every response; returns ``{"overall": (N,), <component>: (N,), ...}``.

        Override for batch-level rewards (e.g. a learned verifier that needs the model); keep ``"overall"``.
        """
        scored = self._scorer(rollout.completions, [reward_fields(sample) for sample in rollout.samples])
        self._reward_failures += scored.timeouts + scored.errors
        self._step_reward_failures = (scored.timeouts, scored.errors)
        if scored.first_error:
            rank_zero_warn(f"the reward failed on {scored.errors} response(s); first error: {scored.first_error}")
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in scored.components.items()}

    def drop_uniform_groups(self, rollout: RolloutBatch) -> tuple[RolloutBatch, float]:
        uniform = obj.uniform_groups(rollout.rewards, rollout.group_size)
        keep = (~uniform).repeat_interleave(rollout.group_size).nonzero().squeeze(-1)
        return rollout.select(keep), float(uniform.sum())

    def single_update_pass(self, num_responses: int) -> bool:
        """One optimiser step over the whole rollout: the old policy *is* the current one, so its
        log-probs come from the update forward itself (detached) and the extra forward is skipped."""
        mini = self.update.mini_batch_size or num_responses
        return self.update.ppo_epochs == 1 and mini >= num_responses

    # ----------------------------------------------------------------------------------------- forwards
    def policy_forward(
        self, model: nn.Module, rollout: RolloutBatch, rows: Tensor, keep_hidden: bool = False
    ) -> ForwardOutput:
        """Log-probs ``(B, T)``, entropy ``(B, T)``, response mask and (optionally) the final-norm hidden
        states ``(B, T, d)`` at the response positions of ``rows``, trimmed to the longest response.

        When :meth:`shares_prompt_prefix`, each distinct prompt among ``rows`` is encoded once (all but its
        last token) and the forward runs over the rest: same result, without repeating the prompt's forward
        and backward for each of its responses."""
        response_mask = rollout.response_mask[rows]
        length = int(response_mask.sum(-1).max())
        prompt = rollout.prompt_length
        input_ids = rollout.input_ids[rows, : prompt + length]
        attention_mask = rollout.attention_mask[rows, : prompt + length]
        extra = rollout.forward_inputs(rows, prompt + length)
        # numbered as generate() numbers left-padded rows; with images Qwen-VL derives its 3-D (time, height,
        # width) rotary positions from mm_token_type_ids and the image grids itself, as generate() did
        position_ids = None if "image_grid_thw" in extra else (attention_mask.cumsum(-1) - 1).clamp(min=0)
        start = 0  # the first position the forward below runs over
        if self.shares_prompt_prefix(rollout, extra):
            start = prompt - 1
            prompts, inverse = torch.unique(rollout.prompt_index[rows], return_inverse=True)
            # the first of the rows of each distinct prompt: their prompt tokens are the same
            first = torch.full_like(prompts, len(rows)).scatter_reduce_(
                0, inverse, torch.arange(len(rows), device=inverse.device), "amin"
            )
            extra[CACHE_ARG] = shared_prefix_cache(
                model, input_ids[first, :start], attention_mask[first, :start], inverse
            )
            position_ids = position_ids[:, start:]
        with capture_output(final_norm(model)) as captured:
            model(
                input_ids=input_ids[:, start:],
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=start > 0,
                logits_to_keep=1,  # the full-vocabulary logits are computed below, in chunks
                **extra,
            )
        hidden = captured[0]  # positions start .. prompt + length - 1
        head_hidden = hidden[:, prompt - start - 1 : -1]  # the states that predict each response token
        logp, entropy = obj.token_logprobs_and_entropy(
            head_hidden,
            input_ids[:, prompt:],
            model.get_output_embeddings(),
            temperature=self.sampling.temperature or 1.0,
            chunk_size=self.update.logprob_chunk_size,
        )
        if not keep_hidden:
            return ForwardOutput(logp, entropy, response_mask[:, :length], None, None)
        return ForwardOutput(logp, entropy, response_mask[:, :length], hidden[:, prompt - start :], head_hidden)

    def shares_prompt_prefix(self, rollout: RolloutBatch, extra: dict[str, Tensor]) -> bool:
        """Whether :meth:`policy_forward` encodes each prompt once for all its responses. Not with images (their
        rotary positions span the whole sequence), in a gradient-checkpointed forward with grad (HF then drops
        the cache: the replayed layers would write it twice) nor on a sharded model (FSDP expects one forward
        per backward)."""
        return (
            rollout.prompt_length > 1
            and rollout.prompt_index is not None
            and not extra
            and not (self.model_setup.gradient_checkpointing and torch.is_grad_enabled())
            and self.device_mesh is None
        )

    @torch.no_grad()
    def sequence_logprobs(self, model: nn.Module, rollout: RolloutBatch, rows: Tensor | None = None) -> Tensor:
        """Log-probs of the responses of ``rows`` (default all) under ``model`` (no grad), ``(len(rows), T)``
        padded with zeros to the rollout's width."""
        rows = torch.arange(len(rollout), device=self.device) if rows is None else rows
        out = None
        for index in torch.arange(len(rows), device=self.device).split(self.update.micro_batch_size):
            logp, _, mask, _, _ = self.policy_forward(model, rollout, rows[index])
            if out is None:  # float32, or float64 for a float64 model
                out = logp.new_zeros(len(rows), rollout.response_mask.shape[1])
            out[index, : logp.shape[1]] = logp * mask
        return out if out is not None else torch.zeros(0, rollout.response_mask.shape[1], device=self.device)

    def reference_logprobs(self, rollout: RolloutBatch, rows: Tensor) -> Tensor:
        """:meth:`sequence_logprobs` under the reference policy (a frozen copy, or the adapter disabled)."""
        reference, context = self.model_setup.reference(self.policy, self._reference[0])
        with self._step_timer("ref") if self._step_timer else nullcontext(), context:
            return self.sequence_logprobs(reference, rollout, rows)

    def reference_kl(self, rollout: RolloutBatch, rows: Tensor, logp: Tensor) -> Callable[[Tensor], Tensor]:
        """``PolicyForward.reference_kl`` of the micro-batch ``rows`` whose current log-probs are ``logp``."""

        def kl_of(selected: Tensor) -> Tensor:
            width = logp.shape[1]
            if rollout.ref_logp is not None:
                ref_logp = rollout.ref_logp[rows[selected], :width]
            else:
                known = rollout.ref_logp_of_rows
                wanted = rows[selected].tolist()
                missing = [row for row in wanted if row not in known]
                if missing:
                    computed = self.reference_logprobs(rollout, torch.tensor(missing, device=self.device))
                    known.update(zip(missing, computed))
                ref_logp = torch.stack([known[row][:width] for row in wanted]) if wanted else logp.new_zeros(0, width)
            return obj.kl_penalty(logp[selected], ref_logp, self.objective.kl_estimator)

        return kl_of

    @torch.no_grad()
    def response_hidden_states(self, rollout: RolloutBatch) -> list[tuple[Tensor, Tensor]]:
        """Final-norm hidden states at the response positions, without gradient, one ``(hidden, mask)``
        pair per micro-batch (for callbacks such as the Koopman dictionary fit)."""
        pairs = []
        for rows in torch.arange(len(rollout), device=self.device).split(self.update.micro_batch_size):
            _, _, mask, hidden, _ = self.policy_forward(self.policy, rollout, rows, keep_hidden=True)
            pairs.append((hidden.detach(), mask))
        return pairs

    # ----------------------------------------------------------------------------------------- update
    def update_policy(self, rollout: RolloutBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped-surrogate updates over mini-batches of whole groups."""
        optimizer = self.optimizers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        mini = self.update.mini_batch_size or len(rollout)
        callbacks = rlvr_callbacks(self.trainer)
        stats = MeanAccumulator()
        for _ in range(self.update.ppo_epochs):
            for mini_rows in self.shuffled_groups(rollout).split(mini):
                batch = self.mini_batch(rollout, mini_rows)
                optimizer.zero_grad(set_to_none=True)
                selected = self.token_selection(batch)
                for callback in callbacks:
                    callback.on_mini_batch_start(self.trainer, self, batch)
                for rows in batch.micro_batches:
                    loss, micro_stats = self.micro_batch_loss(batch, rows, selected)
                    self.manual_backward(loss)
                    stats.add(micro_stats, weight=len(rows))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.update.grad_clip)
                finite = bool(torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                    self.rollout_engine.policy_updated(self)
                else:  # a non-finite gradient would poison the weights and every checkpoint after them
                    optimizer.zero_grad(set_to_none=True)
                    self._skipped_updates += 1
                stats.add(
                    {
                        "actor/grad_norm": float(grad_norm) if finite else float("nan"),
                        "actor/grad_clipped": float(finite and float(grad_norm) > self.update.grad_clip),
                        "actor/skipped_updates": float(not finite),
                    }
                )
        return {**stats.means(), "actor/skipped_updates_total": float(self._skipped_updates)}

    def shuffled_groups(self, rollout: RolloutBatch) -> Tensor:
        """All rows, groups in random order, each group's rows kept together."""
        order = torch.randperm(len(rollout) // rollout.group_size)
        rows = order[:, None] * rollout.group_size + torch.arange(rollout.group_size)
        return rows.reshape(-1).to(self.device)

    def mini_batch(self, rollout: RolloutBatch, rows: Tensor) -> MiniBatch:
        """One optimiser step's rows, cut into micro-batches of at most ``micro_batch_size`` responses that hold
        whole groups whenever a group fits in one (so group-level terms need no extra forward)."""
        size = self.update.micro_batch_size
        if rollout.group_size <= size:
            size -= size % rollout.group_size
        mask = rollout.response_mask[rows]
        normaliser = float(mask.sum()) if self.objective.loss_agg == "token-mean" else float(len(rows))
        return MiniBatch(
            rollout=rollout,
            rows=rows,
            micro_batches=list(rows.split(size)),
            normaliser=normaliser,
            loss_agg_mode=self.objective.loss_agg,
            forward=lambda wanted, keep_hidden=False: self.detached_forward(rollout, wanted, keep_hidden),
        )

    def detached_forward(self, rollout: RolloutBatch, rows: Tensor, keep_hidden: bool = False) -> Iterator[DetachedForward]:
        """:meth:`policy_forward` of the policy over ``rows`` without gradient, ``micro_batch_size`` rows at a time."""
        for part in rows.split(self.update.micro_batch_size) if len(rows) else ():
            with torch.no_grad():
                out = self.policy_forward(self.policy, rollout, part, keep_hidden=keep_hidden)
            yield DetachedForward(part, out.logp, out.mask, out.hidden)

    def token_selection(self, batch: MiniBatch) -> Tensor | None:
        """The tokens Clip-Cov or KL-Cov act on, chosen over the whole mini-batch, ``(N, T)`` over the rollout's
        rows (None for PPO, or when the mini-batch is a single micro-batch: that forward chooses them itself).
        Costs a no-grad forward over the mini-batch: the covariance is centred and the budget counted over it."""
        if self.objective.policy_loss == "ppo" or len(batch.micro_batches) == 1:
            return None
        rollout = batch.rollout
        logp = torch.zeros(len(rollout), rollout.response_mask.shape[1], dtype=torch.float64, device=self.device)
        for part in batch.forward(batch.rows, False):
            logp[part.rows, : part.logp.shape[1]] = part.logp.double()
        rows = batch.rows
        old_logp = logp[rows] if rollout.old_logp is None else rollout.old_logp[rows]
        selected = torch.zeros_like(rollout.response_mask)
        selected[rows] = self.select_tokens(logp[rows], old_logp, rollout.advantages[rows], rollout.response_mask[rows])
        return selected

    def select_tokens(self, logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        cfg = self.objective
        if cfg.policy_loss == "clip_cov":
            return obj.clip_cov_selection(
                logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.clip_cov_ratio, cfg.clip_cov_bounds
            )
        return obj.kl_cov_selection(logp, advantages, mask, cfg.kl_cov_ratio)

    def micro_batch_loss(self, batch: MiniBatch, rows: Tensor, selected: Tensor | None) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the mini-batch loss (the shares add up to the loss over the mini-batch)."""
        rollout, normaliser, share = batch.rollout, batch.normaliser, len(rows) / len(batch.rows)
        callbacks = rlvr_callbacks(self.trainer)
        keep_hidden = any(cb.needs_hidden_states for cb in callbacks)
        logp, entropy, mask, hidden, head_hidden = self.policy_forward(self.policy, rollout, rows, keep_hidden=keep_hidden)
        width = logp.shape[1]
        advantages = rollout.advantages[rows]
        old_logp = logp.detach() if rollout.old_logp is None else rollout.old_logp[rows, :width]
        cfg = self.objective
        if cfg.policy_loss == "ppo":
            per_token, clip = obj.clipped_surrogate(logp, old_logp, advantages, cfg.clip_low, cfg.clip_high)
        else:
            chosen = selected[rows, :width] if selected is not None else self.select_tokens(logp, old_logp, advantages, mask)
            if cfg.policy_loss == "clip_cov":
                per_token, clip = obj.clip_cov_surrogate(logp, old_logp, advantages, cfg.clip_low, cfg.clip_high, chosen)
            else:
                per_token, clip = obj.kl_cov_surrogate(logp, old_logp, advantages, chosen, cfg.kl_cov_coef)
        tis_stats = {}
        if rollout.rollout_logp is not None:  # sampled by an engine of its own: truncated importance sampling
            weights, tis_stats = truncated_importance_weights(
                old_logp, rollout.rollout_logp[rows, :width], mask, self.rollout_engine.importance_cap
            )
            per_token = per_token * weights
        pg_loss = obj.aggregate(per_token, mask, cfg.loss_agg, normaliser)
        loss = pg_loss
        reference_kl = self.reference_kl(rollout, rows, logp) if self.needs_reference else None
        kl = None if rollout.ref_logp is None else obj.kl_penalty(logp, rollout.ref_logp[rows, :width], cfg.kl_estimator)
        stats = {  # detached tensors: read once per step (MeanAccumulator), not at every micro-batch
            "actor/pg_loss": pg_loss.detach() / share,
            "actor/entropy": obj.masked_mean(entropy.detach(), mask),
            "actor/pg_clipfrac_lower": obj.masked_mean(clip["clipped_low"].float(), mask),
            "actor/pg_clipfrac_higher": obj.masked_mean(clip["clipped_high"].float(), mask),
            "actor/ppo_kl": obj.masked_mean(clip["approx_kl"].detach(), mask),
        }
        stats["actor/pg_clipfrac"] = stats["actor/pg_clipfrac_lower"] + stats["actor/pg_clipfrac_higher"]
        if "cov_selected" in clip:
            stats["actor/cov_selected_frac"] = obj.masked_mean(clip["cov_selected"].float(), mask)
        stats.update(tis_stats)
        if kl is not None:
            kl_loss = obj.aggregate(kl, mask, cfg.loss_agg, normaliser)
            stats["actor/kl_loss"] = kl_loss.detach() / share
            if cfg.kl_coef > 0:
                loss = loss + cfg.kl_coef * kl_loss
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * obj.aggregate(entropy, mask, cfg.loss_agg, normaliser)
        forward = PolicyForward(
            response_mask=mask,
            logp=logp,
            advantages=advantages,
            group_index=rollout.group_index[rows],
            rows=rows,
            hidden=hidden,
            head_hidden=head_hidden,
            reference_kl=reference_kl,
            loss_agg_mode=cfg.loss_agg,
            normaliser=normaliser,
            mini_batch_responses=len(batch.rows),
            max_new_tokens=self.sampling.max_new_tokens,
            global_step=self.global_step,
        )
        for callback in callbacks:
            terms: LossTerms | None = callback.policy_loss_terms(self.trainer, self, forward)
            if terms is None:
                continue
            for name, value in terms.losses.items():
                loss = loss + value  # already this micro-batch's share (extension.py's loss contract)
                stats[name] = value.detach() / share
            stats.update({k: float(v) for k, v in terms.metrics.items()})
        return loss, stats

    # ----------------------------------------------------------------------------------------- validation
    def validation_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        cfg = self.validation
        sampling = replace(
            self.sampling,
            num_responses=cfg.num_responses,
            max_new_tokens=cfg.max_new_tokens or self.sampling.max_new_tokens,
            temperature=cfg.temperature,
        )
        greedy = cfg.temperature == 0
        rollout = self.generate(batch, sampling, greedy=greedy)
        components = self.compute_rewards(rollout)
        for name, values in components.items():
            self.val_metric("val/reward" if name == "overall" else f"val/{name}").update(values)
        self.val_metric("val/response_length").update(rollout.response_mask.sum(-1).float())
        k = rollout.group_size
        per_prompt = correctness(components).view(-1, k)  # (prompts, k)
        self.val_metric(f"val/accuracy/mean@{k}").update(per_prompt.mean(-1))
        self.val_metric(f"val/accuracy/pass@{k}").update(per_prompt.max(-1).values)
        for sample, value in zip(batch, per_prompt.mean(-1)):
            source = re.sub(r"[^\w.@-]+", "_", str(sample.get("data_source") or sample.get("source")))
            self.val_metric(f"val/accuracy/source/{source}").update(value)
        if greedy:
            self.val_metric("val/accuracy/greedy").update(per_prompt[:, 0])
        elif cfg.greedy:
            greedy_rollout = self.generate(batch, replace(sampling, num_responses=1), greedy=True)
            self.val_metric("val/accuracy/greedy").update(correctness(self.compute_rewards(greedy_rollout)))

    test_step = validation_step

    def on_validation_start(self) -> None:
        # Validation samples from a copy of the generators, so training draws the same numbers whether a validation
        # ran or not: a run resumed from the checkpoint written just before a validation does not run it again.
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        self._rng_before_validation = (torch.get_rng_state(), cuda)

    def on_validation_end(self) -> None:
        cpu, cuda = self._rng_before_validation
        torch.set_rng_state(cpu)
        if cuda:
            torch.cuda.set_rng_state_all(cuda)

    def val_metric(self, name: str) -> MeanMetric:
        if name not in self._val_metrics:
            self._val_metrics[name] = MeanMetric(nan_strategy="ignore").to(self.device)
        return self._val_metrics[name]

    def on_validation_epoch_end(self) -> None:
        """Log every validation mean over all ranks. Ranks may have seen different data sources, so the names are
        gathered first: every rank then syncs the same metrics in the same order."""
        names = set(self._val_metrics)
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            gathered: list[list[str] | None] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, sorted(names))
            names = set().union(*gathered)
        for name in sorted(names):
            metric = self.val_metric(name)
            # already reduced over ranks by compute(); sync_dist averages equal values (and keeps Lightning quiet)
            self.log(name, metric.compute(), prog_bar=name == "val/accuracy", sync_dist=True)
            metric.reset()

    on_test_epoch_end = on_validation_epoch_end

    # ----------------------------------------------------------------------------------------- metrics
    def rollout_metrics(self, rollout: RolloutBatch) -> dict[str, float]:
        lengths = rollout.response_mask.sum(-1).float()
        metrics = {
            "critic/score/mean": float(rollout.rewards.mean()),
            "critic/score/std": float(rollout.rewards.std()) if len(rollout) > 1 else 0.0,
            "critic/advantages/abs_mean": float(rollout.advantages.abs().mean()),
            "critic/frac_reward_zero_std": float(obj.uniform_groups(rollout.rewards, rollout.group_size).float().mean()),
            "response_length/mean": float(lengths.mean()),
            "response_length/max": float(lengths.max()),
            "response_length/clip_ratio": float((lengths >= self.sampling.max_new_tokens).float().mean()),
            "reward/failures_total": float(self._reward_failures),
        }
        timeouts, errors = self._step_reward_failures
        metrics["reward/timeouts"], metrics["reward/errors"] = float(timeouts), float(errors)
        if self._skipped_long_prompts is not None:
            metrics["data/skipped_long_prompts"] = float(self._skipped_long_prompts)
        for name, values in rollout.reward_components.items():
            if name != "overall":
                metrics[f"reward/{name}"] = float(values.mean())
        return metrics

    def performance_metrics(self, rollout: RolloutBatch, timer: PhaseTimer) -> dict[str, float]:
        response_tokens = float(rollout.response_mask.sum())
        all_tokens = float(rollout.attention_mask.sum())
        step = timer.total()
        metrics = {
            "perf/throughput": all_tokens / max(step, 1e-9) / max(self.trainer.world_size, 1),
            "perf/gen_tokens_per_s": response_tokens / max(timer.seconds.get("gen", 0.0), 1e-9),
            "perf/max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }
        if self.device.type == "cuda":
            metrics["perf/max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    # ----------------------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the sampling RNG in the checkpoint so a resumed run draws the same responses."""
        checkpoint["state_dict"] = self.model_setup.checkpoint_state_dict(self.policy, checkpoint["state_dict"])
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": numpy_state_to_tensors(np.random.get_state()),
            "python": random.getstate(),
        }
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # rank 0 writes the (metadata) file: every rank's generator goes in it, each resumes its own
            per_rank = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, checkpoint["rng_states"])
            checkpoint["rng_states_per_rank"] = per_rank
        checkpoint["reward_failures_total"] = self._reward_failures
        checkpoint["skipped_updates_total"] = self._skipped_updates

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.model_setup.check_checkpoint(self.policy, checkpoint)
        self.rollout_engine.policy_updated(self)  # the checkpoint's weights replace the ones an engine holds
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank is not None and len(per_rank) == self.trainer.world_size:
            states = per_rank[self.global_rank]
        # applied in on_train_start: in between, Lightning creates the DataLoader iterator, which draws its base
        # seed from the global generator (an uninterrupted run drew it before its first step, not here)
        self._resumed_rng_states = states or None
        self._reward_failures = checkpoint.get("reward_failures_total", 0)
        self._skipped_updates = checkpoint.get("skipped_updates_total", 0)

    def on_train_start(self) -> None:
        states, self._resumed_rng_states = self._resumed_rng_states, None
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            np.random.set_state(numpy_state_from_tensors(states["numpy"]))
            random.setstate(states["python"])
        elif self.trainer.world_size > 1:
            # seed_everything seeds every rank alike: ranks would sample their responses with the same random draws
            torch.manual_seed(torch.initial_seed() + self.global_rank)


class ForwardOutput(NamedTuple):
    """What :meth:`RLVRModule.policy_forward` returns, all at the response positions of its rows."""

    logp: Tensor  # (B, T) log-probabilities of the sampled tokens
    entropy: Tensor  # (B, T) true entropy of the next-token distribution
    mask: Tensor  # (B, T) bool response mask
    hidden: Tensor | None  # (B, T, d) final-norm states at the response tokens (keep_hidden)
    head_hidden: Tensor | None  # (B, T, d) final-norm states that predict the response tokens (keep_hidden)


def correctness(components: dict[str, Tensor]) -> Tensor:
    """Per response, how right it is: the reward's ``accuracy`` component, else its ``overall`` score."""
    return components.get("accuracy", components["overall"])


def reward_fields(sample: dict[str, Any]) -> dict[str, Any]:
    """The row as the reward worker receives it: without images or other binary columns, which would be
    pickled to the worker once per response for nothing (a reward that needs the images overrides
    ``compute_rewards``, which sees ``rollout.samples`` whole)."""
    return {k: v for k, v in sample.items() if k != "images" and not is_binary(v)}


def is_binary(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(is_binary(v) for v in value)
    return isinstance(value, (bytes, bytearray, Image.Image)) or (isinstance(value, dict) and "bytes" in value)


def numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    """NumPy's RNG state in types that ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return state["name"], keys, state["pos"], state["has_gauss"], state["cached_gaussian"]


class PhaseTimer:
    """Wall time per named phase of a step (CUDA work is synchronised so it is counted where it runs)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        self._sync()
        begin = time.perf_counter()
        yield
        self._sync()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - begin

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def total(self) -> float:
        return time.perf_counter() - self.start

    def metrics(self) -> dict[str, float]:
        out = {f"timing_s/{k}": v for k, v in self.seconds.items()}
        out["timing_s/step"] = self.total()
        return out


class MeanAccumulator:
    """Weighted means of per-micro-batch statistics. Tensor values stay on their device until :meth:`means`, so
    the update loop does not wait for the device at every micro-batch; NaN floats (undefined statistics) are
    left out."""

    def __init__(self) -> None:
        self.sums: dict[str, float | Tensor] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float | Tensor], weight: float = 1.0) -> None:
        for k, v in values.items():
            if isinstance(v, Tensor) or not math.isnan(v):
                self.sums[k] = self.sums[k] + v * weight
                self.weights[k] += weight

    def means(self) -> dict[str, float]:
        return {k: float(self.sums[k]) / self.weights[k] for k in self.sums}


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Keep ``module``'s forward output (with its autograd graph) while the context is open."""
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield captured
    finally:
        handle.remove()
