"""RLVRModule: one GRPO step, readable top to bottom (see ``training_step``).

Each phase sends you to one room: the rollout engine samples (:mod:`relax_pl.rollout`), the rewards score
(:mod:`relax_pl.rewards`), forwards read the responses (:mod:`relax_pl.forward`), the policy loss is a plug-in
(:mod:`relax_pl.losses`), callbacks add their terms (:mod:`relax_pl.extension`), and what is logged is computed in
:mod:`relax_pl.metrics`.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Callable

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from relax_pl import objectives as obj
from relax_pl import rng
from relax_pl.correction import truncated_importance_weights
from relax_pl.evaluation import PromptResult, score_prompts
from relax_pl.families import family_of
from relax_pl.extension import LossTerms, MiniBatch, PolicyForward, RLVRCallback, rlvr_callbacks
from relax_pl.config import ObjectiveConfig, OptimizerConfig, UpdateConfig, ValidationConfig
from relax_pl.forward import ResponseForward, reference_kl
from relax_pl.losses import LossInput, UpdatePlan, mini_batch_selection
from relax_pl.metrics import MeanAccumulator, PhaseTimer, RunCounters, ValidationMeans, correctness
from relax_pl.metrics import performance_metrics, rollout_metrics
from relax_pl.errors import RecipeError, RewardFailedError
from relax_pl.data.prompts import load_processing, prompt_tokens, render_prompt
from relax_pl.models import EMBEDDED_MODEL
from relax_pl.rewards import MathReward, RewardScorer, VerifiableReward, named_rewards, reward_fields
from relax_pl.rollout import HFGenerate, RolloutBatch, RolloutContext, RolloutEngine, SamplingConfig
from relax_pl.setups import RunLayout, Setup, SingleDevice
from relax_pl.vision import VisionConfig


class RLVRModule(L.LightningModule):
    """Owns the policy, the reference policy and the verifiable reward; runs GRPO with manual optimisation.

    Subclass it and override :meth:`compute_rewards` for rewards that need the whole batch or the model.
    Callbacks join the step through :mod:`relax_pl.extension`.

    Args:
        pretrained: hub id, local folder, ``.gguf`` file or ``embedded:smollm2-135m-instruct``.
        setup: the hardware layout (:mod:`relax_pl.setups`); decides the Trainer's strategy.
        reward: scores one response against its dataset row; bounded in wall time. A list trains on the rewards'
            weighted sum, each logged under its own name (:class:`~relax_pl.rewards.RewardScorer`).
        reward_weights: one weight per reward of a list (default: all 1).
        rollout: the engine that samples the responses (:mod:`relax_pl.rollout`): the policy itself (``HFGenerate``,
            the default, or ``HFContinuousBatching``) or a vLLM engine beside it (``VLLM``).
        sampling, objective, update, optimizer, validation: see their dataclasses.
        vision: image resizing for vision-language models (Qwen2-VL, Qwen2.5-VL), whose prompts are encoded by
            the checkpoint's processor with each row's images; ignored for text-only models.
        max_failed_reward_steps: stop the run after this many training steps in a row on which a reward failed
            (raised or timed out) on every response, naming the reward and its first error; 0 never stops.
        chat_template: overrides the tokenizer's chat template (a Jinja string).
        trust_remote_code: passed to transformers; never set unless the recipe asks.
    """

    def __init__(
        self,
        pretrained: str = EMBEDDED_MODEL,
        setup: Setup = lazy_instance(SingleDevice),
        reward: VerifiableReward | list[VerifiableReward] = lazy_instance(MathReward),
        reward_weights: list[float] | None = None,
        rollout: RolloutEngine = lazy_instance(HFGenerate),
        sampling: SamplingConfig = SamplingConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        validation: ValidationConfig = ValidationConfig(),
        vision: VisionConfig = VisionConfig(),
        max_failed_reward_steps: int = 3,
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        named_rewards(reward, reward_weights)  # a bad combination fails when the recipe is read
        if max_failed_reward_steps < 0:
            raise RecipeError("model.max_failed_reward_steps", max_failed_reward_steps, "must be >= 0 (0: never stop)")
        self.automatic_optimization = False
        self.pretrained = pretrained
        self.model_setup = setup
        self.reward, self.reward_weights = reward, reward_weights
        self.rollout_engine = rollout
        self.sampling, self.objective, self.update = sampling, objective, update
        self.optimizer_config, self.validation, self.vision = optimizer, validation, vision
        self.max_failed_reward_steps = max_failed_reward_steps
        self._failed_reward_steps: dict[str, int] = {}  # per reward: the training steps in a row it failed entirely
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self.processor = None  # vision-language models only
        self.family = None  # the checkpoint's ModelFamily (None for a GGUF file: a text model)
        self._reference: list[nn.Module | None] = [None]  # a list keeps it out of state_dict and .parameters()
        self._scorer: RewardScorer | None = None
        self._counters = RunCounters()  # reward failures and skipped updates, kept in checkpoints
        self._resumed_rng_states: dict[str, Any] | None = None  # set on resume, applied in on_train_start
        self._val_means = ValidationMeans()
        self._rng_before_validation: tuple[Tensor, list[Tensor]] | None = None  # restored after validation
        self._step_timer: PhaseTimer | None = None  # the running training step's

    # ----------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the models lazily: a bad recipe fails in the parser before any weights are read."""
        if self.policy is not None:
            return
        self.model_setup.check(self.run_layout())
        self.load_processing()
        self.rollout_engine.check(self.rollout_context())
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.policy = self.model_setup.build_policy(
            self.pretrained, trust_remote_code=self.trust_remote_code, device=device
        )
        family_of(self.policy).check(self.policy)  # a model without an adapter fails here, not after a rollout
        self.policy.train()  # from_pretrained returns eval mode, in which HF silently skips gradient checkpointing
        if self.needs_reference:
            self._reference[0] = self.model_setup.build_reference(self.policy)
        self.model_setup.parallelize(self.policy, self._reference[0], self.device_mesh)
        self.rollout_engine.setup(self.rollout_context())
        self.strict_loading = self.model_setup.strict_loading

    def run_layout(self) -> RunLayout:
        """What the setup is checked against: the trainer's processes and strategy, the recipe's update."""
        if self._trainer is None:
            return RunLayout(device=self.device, dynamic_sampling=self.update.dynamic_sampling)
        trainer = self.trainer
        return RunLayout(
            trainer.world_size, trainer.strategy.root_device, trainer.strategy, self.update.dynamic_sampling
        )

    def rollout_context(self) -> RolloutContext:
        """All the rollout engine sees of the run (the policy is None until it is built)."""
        layout, validation = self.run_layout(), self.validation
        trainer = self.trainer if self._trainer is not None else None
        policy, setup = self.policy, self.model_setup
        return RolloutContext(
            tokenizer=self.tokenizer, policy=policy, processor=self.processor, family=self.family,
            pretrained=self.pretrained, trust_remote_code=self.trust_remote_code, vision=self.vision,
            device=layout.device, dtype=setup.forward_dtype(layout.device),
            rank=trainer.global_rank if trainer else 0, local_rank=trainer.local_rank if trainer else 0,
            world_size=layout.world_size, lockstep=setup.lockstep, generation=lambda: setup.generation(policy),
            max_prompt_tokens=self.sampling.max_prompt_tokens,
            max_new_tokens=max(self.sampling.max_new_tokens, validation.max_new_tokens or 0),
            step=lambda: self.global_step,
        )

    def load_processing(self) -> None:
        """The tokenizer and, for a vision-language checkpoint, its processor (no weights are read)."""
        if self.tokenizer is None:
            self.tokenizer, self.family, self.processor = load_processing(
                self.pretrained, self.vision, self.chat_template, self.trust_remote_code
            )

    @property
    def needs_reference(self) -> bool:
        callbacks = rlvr_callbacks(self.trainer) if self._trainer is not None else []
        return self.objective.kl_coef > 0 or any(cb.needs_reference for cb in callbacks)

    @property
    def reference_up_front(self) -> bool:
        """Whether the reference log-probs of every response are computed before the update. Otherwise
        (only callbacks need a reference) ``PolicyForward.reference_kl`` runs the reference over the rows they
        select. A lockstep setup always runs it up front: its ranks' forwards must be the same."""
        return self.needs_reference and (self.objective.kl_coef > 0 or self.model_setup.lockstep)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer_config.build([p for p in self.policy.parameters() if p.requires_grad])

    def on_fit_start(self) -> None:
        if self._reference[0] is not None:
            self._reference[0].to(self.device)

    def setup(self, stage: str) -> None:
        per_node = self.trainer.num_devices if self._trainer is not None else 1  # each its own scoring pools
        self._scorer = RewardScorer(self.reward, self.reward_weights, processes_per_node=per_node)
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if stage == "fit":
            self.check_update_plan(getattr(datamodule, "batch_size", None))
        if self.sampling.on_long_prompt == "skip" and hasattr(datamodule, "drop_long_prompts"):
            self.load_processing()
            limit = self.sampling.max_prompt_tokens
            self._counters.skipped_long_prompts = datamodule.drop_long_prompts(self.prompt_tokens, limit)

    def check_update_plan(self, prompts_per_step: int | None) -> None:
        """Refuse update settings that would silently compute something else than asked (before any weights load)."""
        group, mini = self.sampling.num_responses, self.update.mini_batch_size
        if group < 2:
            raise RecipeError(
                "model.sampling.num_responses", group, "GRPO's advantage is relative to the prompt's group, so a group "
                "of one has advantage 0 and trains nothing; use 2 or more (model.validation.num_responses sets how "
                "many answers validation samples)"
            )
        if mini is not None and mini % group:
            raise ValueError(
                f"model.update.mini_batch_size={mini} is not a multiple of model.sampling.num_responses={group}: an "
                f"optimiser step must hold whole prompt groups (group-relative advantages, group-level callback terms)"
            )
        responses = None if prompts_per_step is None else prompts_per_step * group
        self.objective.policy_loss.check(UpdatePlan(self.update.ppo_epochs, mini, responses))

    def prompt_tokens(self, sample: dict[str, Any]) -> int:
        """Tokens of the rendered prompt, each image counted at its size after resizing (no pixels are processed)."""
        return prompt_tokens(self.tokenizer, self.processor, self.family, self.render_prompt(sample), sample)

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
            rollout.rewards, rollout.group_size, scale=self.objective.advantages_scaled
        )
        metrics = {**rollout_metrics(rollout, self.sampling.max_new_tokens), **self._counters.metrics()}
        accuracy = correctness(rollout.reward_components)
        if accuracy is not None:  # for the progress bar; TensorBoard has it as reward/accuracy (or reward/<Name>/...)
            self.log("accuracy", accuracy.mean(), prog_bar=True, logger=False, batch_size=1)
        if self.update.dynamic_sampling:
            rollout, metrics["data/dropped_groups"] = self.drop_uniform_groups(rollout)
        callbacks = rlvr_callbacks(self.trainer)
        # in one on-policy pass the old policy is the current one: the update's own forward gives its log-probs
        single_pass = UpdatePlan(self.update.ppo_epochs, self.update.mini_batch_size, len(rollout)).single_pass
        self.share_hidden_states(rollout, callbacks, keep_logp=not single_pass)
        for callback in callbacks:
            callback.on_rollout_end(self.trainer, self, rollout)
        if len(rollout):
            if not single_pass and rollout.old_logp is None:
                with timer("old"):
                    rollout.old_logp = self.response_forward.logprobs(self.policy, rollout)
            if self.reference_up_front:
                rollout.ref_logp = self.reference_logprobs(rollout, torch.arange(len(rollout), device=self.device))
            with timer("update"):
                metrics.update(self.update_policy(rollout))
        metrics.update(self.rollout_engine.verify_rollout(metrics.get("rollout/logp_abs_diff")))
        metrics.update(timer.metrics())
        metrics.update(performance_metrics(rollout, timer, self.trainer.world_size, self.device))
        self.log("reward", metrics["critic/score/mean"], prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def generate(
        self, batch: list[dict[str, Any]], sampling: SamplingConfig | None = None, greedy: bool = False
    ) -> RolloutBatch:
        prompts = [self.render_prompt(sample) for sample in batch]
        return self.rollout_engine.generate(prompts, batch, sampling or self.sampling, greedy=greedy)

    def render_prompt(self, sample: dict[str, Any]) -> str:
        return render_prompt(self.tokenizer, self.processor, sample, self.pretrained)

    def compute_rewards(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        """Score every response; returns ``{"overall": (N,), <component>: (N,), ...}``.

        Override for batch-level rewards (e.g. a learned verifier that needs the model); keep ``"overall"``.
        """
        scored = self._scorer(rollout.completions, [reward_fields(sample) for sample in rollout.samples])
        self._counters.scored(scored.timeouts, scored.errors)
        if scored.first_error:
            rank_zero_warn(f"the reward failed on {scored.errors} response(s); first error: {scored.first_error}")
        if self._trainer is not None and self.trainer.training:
            self.stop_on_failing_reward(scored.all_failed)
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in scored.components.items()}

    def stop_on_failing_reward(self, all_failed: dict[str, str]) -> None:
        """Count, per reward, the training steps in a row on which it failed on every response; raise once one
        reaches ``max_failed_reward_steps``: the run would go on training on nothing."""
        self._failed_reward_steps = {name: self._failed_reward_steps.get(name, 0) + 1 for name in all_failed}
        for name, steps in self._failed_reward_steps.items():
            if self.max_failed_reward_steps and steps >= self.max_failed_reward_steps:
                first_error = all_failed[name].strip().splitlines()[-1]  # a worker's traceback: its last line
                raise RewardFailedError(
                    f"the reward {name} failed on every response of {steps} training steps in a row "
                    f"(model.max_failed_reward_steps={self.max_failed_reward_steps}); its first error: {first_error}"
                )

    def drop_uniform_groups(self, rollout: RolloutBatch) -> tuple[RolloutBatch, float]:
        uniform = obj.uniform_groups(rollout.rewards, rollout.group_size)
        keep = (~uniform).repeat_interleave(rollout.group_size).nonzero().squeeze(-1)
        return rollout.select(keep), float(uniform.sum())

    # ----------------------------------------------------------------------------------------- forwards
    @property
    def response_forward(self) -> ResponseForward:
        """Forwards over rollout rows with this run's setup, temperature and micro-batch size."""
        chunk, micro = self.update.logprob_chunk_size, self.update.micro_batch_size
        return ResponseForward(self.model_setup, self.sampling.temperature, chunk, micro)

    def response_hidden_states(self, rollout: RolloutBatch) -> list[tuple[Tensor, Tensor]]:
        """The policy's final-norm hidden states at the response positions, without gradient, one ``(hidden, mask)``
        pair per micro-batch (for callbacks such as the Koopman dictionary fit)."""
        return self.response_forward.hidden_states(self.policy, rollout)

    def share_hidden_states(self, rollout: RolloutBatch, callbacks: list[RLVRCallback], keep_logp: bool) -> None:
        """The step's one no-grad policy forward for callbacks that read hidden states (extension.py, "the shared
        capture"): over the union of the rows they ask for, each chunk handed to each of them. With ``keep_logp``
        and every row read, it also gives ``rollout.old_logp`` (the same forward :meth:`ResponseForward.logprobs`
        would run)."""
        if not callbacks or not len(rollout):
            return
        # timed (0 s when no callback reads this step) in every step of a run with callbacks: a phase logged only now
        # and then would show its last value at every later step
        with self._step_timer("hidden") if self._step_timer else nullcontext():
            wanted = [(cb, cb.rollout_hidden_rows(self.trainer, self, rollout)) for cb in callbacks]
            wanted = [(cb, rows) for cb, rows in wanted if rows is not None and len(rows)]
            if not wanted:
                return
            rows = torch.unique(torch.cat([r.to(self.device) for _, r in wanted]))  # sorted
            old_logp = None
            keep_logp = keep_logp and len(rows) == len(rollout)
            for part in self.response_forward.detached(self.policy, rollout, rows, keep_hidden=True):
                for callback, _ in wanted:
                    callback.on_rollout_hidden_states(self.trainer, self, rollout, part)
                if keep_logp:
                    if old_logp is None:  # float32, or float64 for a float64 model
                        old_logp = part.logp.new_zeros(len(rollout), rollout.response_mask.shape[1])
                    old_logp[part.rows, : part.logp.shape[1]] = part.logp * part.response_mask
            if old_logp is not None:
                rollout.old_logp = old_logp

    def reference_hidden_states(self, rollout: RolloutBatch) -> list[tuple[Tensor, Tensor]]:
        """The reference policy's final-norm hidden states at the response positions, no grad, one ``(hidden, mask)``
        pair per micro-batch (a callback that sets ``needs_reference``; RepExp reads the pre-trained model's)."""
        reference, context = self.model_setup.reference(self.policy, self._reference[0])
        with self._step_timer("ref") if self._step_timer else nullcontext(), context:
            return self.response_forward.hidden_states(reference, rollout)

    def reference_logprobs(self, rollout: RolloutBatch, rows: Tensor) -> Tensor:
        """Log-probs of ``rows`` under the reference policy (a frozen copy, or the adapter disabled), no grad."""
        reference, context = self.model_setup.reference(self.policy, self._reference[0])
        with self._step_timer("ref") if self._step_timer else nullcontext(), context:
            return self.response_forward.logprobs(reference, rollout, rows)

    def reference_kl(self, rollout: RolloutBatch, rows: Tensor, logp: Tensor) -> Callable[[Tensor], Tensor]:
        """``PolicyForward.reference_kl`` of the micro-batch ``rows`` whose current log-probs are ``logp``."""
        estimator = self.objective.kl_estimator
        return reference_kl(rollout, rows, logp, estimator, lambda wanted: self.reference_logprobs(rollout, wanted))

    # ----------------------------------------------------------------------------------------- update
    def update_policy(self, rollout: RolloutBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of policy-loss updates over mini-batches of whole groups."""
        optimizer = self.optimizers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        callbacks = rlvr_callbacks(self.trainer)
        stats = MeanAccumulator()
        for _ in range(self.update.ppo_epochs):
            for batch in self.mini_batches(rollout):
                optimizer.zero_grad(set_to_none=True)
                selected = mini_batch_selection(self.objective.policy_loss, batch)
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
                    self.rollout_engine.policy_updated()
                else:  # a non-finite gradient would poison the weights and every checkpoint after them
                    optimizer.zero_grad(set_to_none=True)
                    self._counters.skipped_updates += 1
                stats.add(
                    {
                        "actor/grad_norm": float(grad_norm) if finite else float("nan"),
                        "actor/grad_clipped": float(finite and float(grad_norm) > self.update.grad_clip),
                        "actor/skipped_updates": float(not finite),
                    }
                )
        return {**stats.means(), "actor/skipped_updates_total": float(self._counters.skipped_updates)}

    def mini_batches(self, rollout: RolloutBatch) -> list[MiniBatch]:
        """One epoch's optimiser steps: whole groups in random order, cut as :meth:`MiniBatch.shuffled` says."""
        forward, update = self.response_forward, self.update
        return MiniBatch.shuffled(
            rollout, update.mini_batch_size, update.micro_batch_size, self.objective.aggregation,
            forward=lambda rows, keep_hidden=False: forward.detached(self.policy, rollout, rows, keep_hidden),
        )

    def micro_batch_loss(
        self, batch: MiniBatch, rows: Tensor, selected: Tensor | None
    ) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the mini-batch loss (the shares add up to the loss over the mini-batch)."""
        rollout, normaliser, share = batch.rollout, batch.normaliser, len(rows) / len(batch.rows)
        budget = self.sampling.max_new_tokens  # seq-mean-token-sum-norm's constant divisor (Dr. GRPO)
        cfg, callbacks = self.objective, rlvr_callbacks(self.trainer)
        keep_hidden = any(cb.needs_hidden_states for cb in callbacks)
        logp, entropy, mask, hidden, head_hidden = self.response_forward(self.policy, rollout, rows, keep_hidden)
        width = logp.shape[1]
        old_logp = logp.detach() if rollout.old_logp is None else rollout.old_logp[rows, :width]
        tokens = LossInput(logp, old_logp, rollout.advantages[rows], mask)
        if cfg.policy_loss.selects_tokens and selected is not None:  # chosen over the mini-batch
            tokens.selected = selected[rows, :width]
        elif cfg.policy_loss.selects_tokens:  # one micro-batch holds the mini-batch: chosen over it here
            tokens.selected = cfg.policy_loss.select(replace(tokens, logp=logp.detach()))
        policy_loss = cfg.policy_loss(tokens)
        per_token, stats = policy_loss.per_token, dict(policy_loss.metrics)  # detached: read once per step
        if rollout.rollout_logp is not None:  # sampled by an engine of its own: truncated importance sampling
            weights, tis_stats = truncated_importance_weights(
                old_logp, rollout.rollout_logp[rows, :width], mask, self.rollout_engine.importance_cap
            )
            per_token = per_token * weights
            stats.update(tis_stats)
        loss = pg_loss = obj.aggregate(per_token, mask, cfg.aggregation, normaliser, budget)
        stats["actor/pg_loss"] = pg_loss.detach() / share
        stats["actor/entropy"] = obj.masked_mean(entropy.detach(), mask)
        stats["actor/ppo_kl"] = obj.masked_mean(old_logp - logp.detach(), mask)  # k1 of KL(pi_old || pi_theta)
        if rollout.ref_logp is not None:
            kl = obj.kl_penalty(logp, rollout.ref_logp[rows, :width], cfg.kl_estimator)
            kl_loss = obj.aggregate(kl, mask, cfg.aggregation, normaliser, budget)
            stats["actor/kl_loss"] = kl_loss.detach() / share
            if cfg.kl_coef > 0:
                loss = loss + cfg.kl_coef * kl_loss
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * obj.aggregate(entropy, mask, cfg.aggregation, normaliser, budget)
        forward = PolicyForward(
            response_mask=mask, logp=logp, advantages=tokens.advantages, group_index=rollout.group_index[rows],
            rows=rows, entropy=entropy, old_logp=old_logp, rewards=rollout.rewards[rows], hidden=hidden,
            head_hidden=head_hidden, loss_agg_mode=cfg.aggregation, normaliser=normaliser,
            reference_kl=self.reference_kl(rollout, rows, logp) if self.needs_reference else None,
            mini_batch_responses=len(batch.rows), max_new_tokens=self.sampling.max_new_tokens,
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
        sampling, greedy = cfg.sampling(self.sampling), cfg.temperature == 0
        rollout = self.generate(batch, sampling, greedy=greedy)
        components = self.compute_rewards(rollout)
        if not self._val_means.add_rollout(components, rollout, batch):
            rank_zero_warn(
                f"no reward of model.reward reports an 'accuracy' component (it returns {sorted(components)}): "
                "validation logs val/reward but no val/accuracy"
            )
        elif greedy:  # every response is the greedy one
            self._val_means.add("val/accuracy/greedy", correctness(components).view(-1, rollout.group_size)[:, 0])
        elif cfg.greedy:
            greedy_rollout = self.generate(batch, replace(sampling, num_responses=1), greedy=True)
            self._val_means.add("val/accuracy/greedy", correctness(self.compute_rewards(greedy_rollout)))

    test_step = validation_step

    def predict_step(self, batch: list[dict[str, Any]], batch_idx: int) -> list[PromptResult]:
        """``python -m relax_pl evaluate`` (:mod:`relax_pl.evaluation`): per prompt, ``validation.num_responses``
        answers at the training temperature and one greedy answer, scored."""
        return score_prompts(self, batch, self.validation.num_responses)

    def on_validation_start(self) -> None:
        # Validation samples from a copy of the generators, so training draws the same numbers whether a validation
        # ran or not: a run resumed from the checkpoint written just before a validation does not run it again.
        self._rng_before_validation = rng.torch_states()

    def on_validation_end(self) -> None:
        rng.restore_torch_states(self._rng_before_validation)

    def on_validation_epoch_end(self) -> None:
        for name, value in self._val_means.compute_all(self.device).items():
            # already reduced over ranks by compute(); sync_dist averages equal values (and keeps Lightning quiet)
            self.log(name, value, prog_bar=name == "val/accuracy", sync_dist=True)

    on_test_epoch_end = on_validation_epoch_end

    # ----------------------------------------------------------------------------------------- state
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the sampling RNG in the checkpoint so a resumed run draws the same responses."""
        checkpoint["state_dict"] = self.model_setup.checkpoint_state_dict(self.policy, checkpoint["state_dict"])
        checkpoint.update(rng.checkpoint_entries(), **self._counters.checkpoint_entries())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.model_setup.check_checkpoint(self.policy, checkpoint)
        self.rollout_engine.policy_updated()  # the checkpoint's weights replace the ones an engine holds
        # applied in on_train_start: in between, Lightning creates the DataLoader iterator, which draws its base
        # seed from the global generator (an uninterrupted run drew it before its first step, not here)
        self._resumed_rng_states = rng.saved_states(checkpoint, self.trainer.world_size, self.global_rank)
        self._counters.load(checkpoint)

    def on_train_start(self) -> None:
        states, self._resumed_rng_states = self._resumed_rng_states, None
        if states:
            rng.restore(states)
        elif self.trainer.world_size > 1:
            # seed_everything seeds every rank alike: ranks would sample their responses with the same random draws
            torch.manual_seed(torch.initial_seed() + self.global_rank)
