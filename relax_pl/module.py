"""RLVRModule: one GRPO step, readable top to bottom (see ``training_step``)."""

from __future__ import annotations

import math
import random
import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from relax_pl import objectives as obj
from relax_pl.extension import LossTerms, PolicyForward, rlvr_callbacks
from relax_pl.models import EMBEDDED_MODEL, final_norm, load_tokenizer
from relax_pl.rewards import BoundedScorer, MathReward, VerifiableReward
from relax_pl.rollout import RolloutBatch, SamplingConfig, generate
from relax_pl.setups import Setup, SingleDevice


@dataclass
class ObjectiveConfig:
    """The policy loss (recipe key ``model.objective``); relax-method.md section 1 and 6."""

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
    """Validation sampling (recipe key ``model.validation``): greedy when temperature is 0."""

    num_responses: int = 1
    temperature: float = 0.0
    max_new_tokens: int | None = None  # None: sampling.max_new_tokens


class RLVRModule(L.LightningModule):
    """Owns the policy, the reference policy and the verifiable reward; runs GRPO with manual optimisation.

    Subclass it and override :meth:`compute_rewards` for rewards that need the whole batch or the model.
    Callbacks join the step through :mod:`relax_pl.extension`.

    Args:
        pretrained: hub id, local folder, ``.gguf`` file or ``embedded:smollm2-135m-instruct``.
        setup: the hardware layout (:mod:`relax_pl.setups`); decides the Trainer's strategy.
        reward: scores one response against its dataset row; bounded in wall time.
        sampling, objective, update, optimizer, validation: see their dataclasses.
        chat_template: overrides the tokenizer's chat template (a Jinja string).
        trust_remote_code: passed to transformers; never set unless the recipe asks.
    """

    def __init__(
        self,
        pretrained: str = EMBEDDED_MODEL,
        setup: Setup = lazy_instance(SingleDevice),
        reward: VerifiableReward = lazy_instance(MathReward),
        sampling: SamplingConfig = SamplingConfig(),
        objective: ObjectiveConfig = ObjectiveConfig(),
        update: UpdateConfig = UpdateConfig(),
        optimizer: OptimizerConfig = OptimizerConfig(),
        validation: ValidationConfig = ValidationConfig(),
        chat_template: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pretrained = pretrained
        self.model_setup = setup
        self.reward = reward
        self.sampling, self.objective, self.update = sampling, objective, update
        self.optimizer_config, self.validation = optimizer, validation
        self.chat_template = chat_template
        self.trust_remote_code = trust_remote_code
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self._reference: list[nn.Module | None] = [None]  # a list keeps it out of state_dict and .parameters()
        self._scorer: BoundedScorer | None = None
        self._reward_failures = 0  # over the run, kept in checkpoints
        self._step_reward_failures = (0, 0)  # (timeouts, errors) of the latest scoring call

    # ----------------------------------------------------------------------------------------- building
    def configure_model(self) -> None:
        """Load the models lazily: a bad recipe fails in the parser before any weights are read."""
        if self.policy is not None:
            return
        self.model_setup.check(self)
        self.tokenizer = load_tokenizer(
            self.pretrained, trust_remote_code=self.trust_remote_code, chat_template=self.chat_template
        )
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        self.policy = self.model_setup.build_policy(
            self.pretrained, trust_remote_code=self.trust_remote_code, device=device
        )
        self.policy.train()  # from_pretrained returns eval mode, in which HF silently skips gradient checkpointing
        if self.needs_reference:
            self._reference[0] = self.model_setup.build_reference(self.policy)
        self.model_setup.parallelize(self.policy, self._reference[0], self.device_mesh)
        self.strict_loading = self.model_setup.strict_loading

    @property
    def needs_reference(self) -> bool:
        callbacks = rlvr_callbacks(self.trainer) if self._trainer is not None else []
        return self.objective.kl_coef > 0 or any(getattr(cb, "needs_reference_logprobs", False) for cb in callbacks)

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
        self._scorer = BoundedScorer(self.reward)

    def teardown(self, stage: str) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    # ----------------------------------------------------------------------------------------- one step
    def training_step(self, batch: list[dict[str, Any]], batch_idx: int) -> None:
        timer = PhaseTimer(self.device)
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
            if self.needs_reference:
                with timer("ref"):
                    reference, context = self.model_setup.reference(self.policy, self._reference[0])
                    with context:
                        rollout.ref_logp = self.sequence_logprobs(reference, rollout)
            with timer("update"):
                metrics.update(self.update_policy(rollout))
        metrics.update(timer.metrics(), **self.performance_metrics(rollout, timer))
        self.log("reward", metrics["critic/score/mean"], prog_bar=True, batch_size=1)
        self.log_dict(metrics, batch_size=1)

    def generate(
        self, batch: list[dict[str, Any]], sampling: SamplingConfig | None = None, greedy: bool = False
    ) -> RolloutBatch:
        prompts = [self.render_prompt(sample) for sample in batch]
        synced = self.trainer.world_size > 1 if self._trainer is not None else False
        sampling = sampling or self.sampling
        with self.model_setup.generation(self.policy):
            return generate(self.policy, self.tokenizer, prompts, batch, sampling, greedy=greedy, synced=synced)

    def render_prompt(self, sample: dict[str, Any]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"the tokenizer of {self.pretrained!r} has no chat template; set model.chat_template in the recipe"
            )
        return self.tokenizer.apply_chat_template(sample["messages"], add_generation_prompt=True, tokenize=False)

    def compute_rewards(self, rollout: RolloutBatch) -> dict[str, Tensor]:
        """Score every response; returns ``{"overall": (N,), <component>: (N,), ...}``.

        Override for batch-level rewards (e.g. a learned verifier that needs the model); keep ``"overall"``.
        """
        scored = self._scorer(rollout.completions, rollout.samples)
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
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Log-probs ``(B, T)``, entropy ``(B, T)``, response mask and (optionally) the final-norm hidden
        states ``(B, T, d)`` at the response positions of ``rows``, trimmed to the longest response."""
        response_mask = rollout.response_mask[rows]
        length = int(response_mask.sum(-1).max())
        prompt = rollout.prompt_length
        input_ids = rollout.input_ids[rows, : prompt + length]
        attention_mask = rollout.attention_mask[rows, : prompt + length]
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
        extra = {k: v[rows.to(v.device)] for k, v in rollout.model_inputs.items()}
        with capture_output(final_norm(model)) as captured:
            model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=1,  # the full-vocabulary logits are computed below, in chunks
                **extra,
            )
        hidden = captured[0]
        head = model.get_output_embeddings()
        logp, entropy = obj.token_logprobs_and_entropy(
            hidden[:, prompt - 1 : -1],
            input_ids[:, prompt:],
            head,
            temperature=self.sampling.temperature or 1.0,
            chunk_size=self.update.logprob_chunk_size,
        )
        return logp, entropy, response_mask[:, :length], hidden[:, prompt:] if keep_hidden else None

    @torch.no_grad()
    def sequence_logprobs(self, model: nn.Module, rollout: RolloutBatch) -> Tensor:
        """Log-probs of every response under ``model`` (no grad), padded to the rollout's width."""
        out = torch.zeros(rollout.response_mask.shape, dtype=torch.float32, device=self.device)
        for rows in torch.arange(len(rollout), device=self.device).split(self.update.micro_batch_size):
            logp, _, mask, _ = self.policy_forward(model, rollout, rows)
            out[rows, : logp.shape[1]] = logp.float() * mask
        return out

    @torch.no_grad()
    def response_hidden_states(self, rollout: RolloutBatch) -> list[tuple[Tensor, Tensor]]:
        """Final-norm hidden states at the response positions, without gradient, one ``(hidden, mask)``
        pair per micro-batch (for callbacks such as the Koopman dictionary fit)."""
        pairs = []
        for rows in torch.arange(len(rollout), device=self.device).split(self.update.micro_batch_size):
            _, _, mask, hidden = self.policy_forward(self.policy, rollout, rows, keep_hidden=True)
            pairs.append((hidden.detach(), mask))
        return pairs

    # ----------------------------------------------------------------------------------------- update
    def update_policy(self, rollout: RolloutBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of clipped-surrogate updates over mini-batches of whole groups."""
        optimizer = self.optimizers()
        params = [p for p in self.policy.parameters() if p.requires_grad]
        n = len(rollout)
        mini = self.update.mini_batch_size or n
        stats = MeanAccumulator()
        for _ in range(self.update.ppo_epochs):
            for mini_rows in self.shuffled_groups(rollout).split(mini):
                mask = rollout.response_mask[mini_rows]
                normaliser = float(mask.sum()) if self.objective.loss_agg == "token-mean" else float(len(mini_rows))
                optimizer.zero_grad(set_to_none=True)
                for rows in mini_rows.split(self.update.micro_batch_size):
                    loss, micro_stats = self.micro_batch_loss(rollout, rows, normaliser, len(rows) / len(mini_rows))
                    self.manual_backward(loss)
                    stats.add(micro_stats, weight=len(rows))
                grad_norm = torch.nn.utils.clip_grad_norm_(params, self.update.grad_clip)
                finite = bool(torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                else:  # a non-finite gradient would poison the weights and every checkpoint after them
                    optimizer.zero_grad(set_to_none=True)
                stats.add(
                    {
                        "actor/grad_norm": float(grad_norm) if finite else float("nan"),
                        "actor/grad_clipped": float(finite and float(grad_norm) > self.update.grad_clip),
                        "actor/skipped_updates": float(not finite),
                    }
                )
        return stats.means()

    def shuffled_groups(self, rollout: RolloutBatch) -> Tensor:
        """All rows, groups in random order, each group's rows kept together."""
        order = torch.randperm(len(rollout) // rollout.group_size)
        rows = order[:, None] * rollout.group_size + torch.arange(rollout.group_size)
        return rows.reshape(-1).to(self.device)

    def micro_batch_loss(
        self, rollout: RolloutBatch, rows: Tensor, normaliser: float, share: float
    ) -> tuple[Tensor, dict[str, float]]:
        callbacks = rlvr_callbacks(self.trainer)
        keep_hidden = any(cb.needs_hidden_states for cb in callbacks)
        logp, entropy, mask, hidden = self.policy_forward(self.policy, rollout, rows, keep_hidden=keep_hidden)
        width = logp.shape[1]
        advantages = rollout.advantages[rows]
        old_logp = logp.detach() if rollout.old_logp is None else rollout.old_logp[rows, :width]
        cfg = self.objective
        if cfg.policy_loss == "ppo":
            per_token, clip = obj.clipped_surrogate(logp, old_logp, advantages, cfg.clip_low, cfg.clip_high)
        elif cfg.policy_loss == "clip_cov":
            per_token, clip = obj.clip_cov_surrogate(
                logp, old_logp, advantages, mask, cfg.clip_low, cfg.clip_high, cfg.clip_cov_ratio, cfg.clip_cov_bounds
            )
        else:
            per_token, clip = obj.kl_cov_surrogate(logp, old_logp, advantages, mask, cfg.kl_cov_ratio, cfg.kl_cov_coef)
        pg_loss = obj.aggregate(per_token, mask, cfg.loss_agg, normaliser)
        loss = pg_loss
        kl = None if rollout.ref_logp is None else obj.kl_penalty(logp, rollout.ref_logp[rows, :width], cfg.kl_estimator)
        stats = {
            "actor/pg_loss": float(pg_loss.detach()) / share,
            "actor/entropy": float(obj.masked_mean(entropy.detach(), mask)),
            "actor/pg_clipfrac_lower": float(obj.masked_mean(clip["clipped_low"].float(), mask)),
            "actor/pg_clipfrac_higher": float(obj.masked_mean(clip["clipped_high"].float(), mask)),
            "actor/ppo_kl": float(obj.masked_mean(clip["approx_kl"], mask)),
        }
        stats["actor/pg_clipfrac"] = stats["actor/pg_clipfrac_lower"] + stats["actor/pg_clipfrac_higher"]
        if kl is not None:
            kl_loss = obj.aggregate(kl, mask, cfg.loss_agg, normaliser)
            stats["actor/kl_loss"] = float(kl_loss.detach()) / share
            if cfg.kl_coef > 0:
                loss = loss + cfg.kl_coef * kl_loss
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * obj.aggregate(entropy, mask, cfg.loss_agg, normaliser)
        forward = PolicyForward(
            response_mask=mask,
            logp=logp,
            advantages=advantages,
            group_index=rollout.group_index[rows],
            hidden=hidden,
            kl=kl,
            loss_agg_mode=cfg.loss_agg,
            global_step=self.global_step,
        )
        for callback in callbacks:
            terms: LossTerms | None = callback.policy_loss_terms(self.trainer, self, forward)
            if terms is None:
                continue
            for name, value in terms.losses.items():
                loss = loss + share * value
                stats[name] = float(value.detach())
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
        rollout = self.generate(batch, sampling, greedy=cfg.temperature == 0)
        components = self.compute_rewards(rollout)
        n = len(rollout)
        for name, values in components.items():
            key = "val/reward" if name == "overall" else f"val/{name}"
            self.log(key, values.mean(), batch_size=n, sync_dist=True, prog_bar=name == "accuracy")
        lengths = rollout.response_mask.sum(-1).float()
        self.log("val/response_length", lengths.mean(), batch_size=n, sync_dist=True)

    test_step = validation_step

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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.model_setup.check_checkpoint(self.policy, checkpoint)
        states = checkpoint.get("rng_states")
        per_rank = checkpoint.get("rng_states_per_rank")
        if per_rank is not None and len(per_rank) == self.trainer.world_size:
            states = per_rank[self.global_rank]
        if states:
            torch.set_rng_state(states["torch"])
            if states["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])
            np.random.set_state(numpy_state_from_tensors(states["numpy"]))
            random.setstate(states["python"])
        self._reward_failures = checkpoint.get("reward_failures_total", 0)


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
    """Weighted means of per-micro-batch statistics."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for k, v in values.items():
            if not math.isnan(v):
                self.sums[k] += v * weight
                self.weights[k] += weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums}


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Keep ``module``'s forward output (with its autograd graph) while the context is open."""
    captured: list[Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield captured
    finally:
        handle.remove()
