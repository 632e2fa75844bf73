"""Forwards over rollout rows, read at the response positions: the policy's (with or without gradient) and the
reference's, for the update, for callbacks and for the reference KL.

Only the response positions reach the vocabulary projection, in chunks under activation checkpointing
(:func:`relax_pl.objectives.token_logprobs_and_entropy`); hidden states are the final norm's output, kept by a
forward hook (never ``output_hidden_states=True``, which keeps every layer). When a prompt has several responses
in the forward, it is encoded once and its key/value cache repeated for them (:func:`shared_prefix_cache`): the
same result, without repeating the prompt's forward and backward per response.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn

from relax_pl import objectives as obj
from relax_pl.extension import DetachedForward
from relax_pl.families import family_of
from relax_pl.rollout import CACHE_ARG, RolloutBatch, shared_prefix_cache
from relax_pl.setups import Setup


class ForwardOutput(NamedTuple):
    """What :class:`ResponseForward` returns, all at the response positions of its rows."""

    logp: Tensor  # (B, T) log-probabilities of the sampled tokens
    entropy: Tensor  # (B, T) true entropy of the next-token distribution
    mask: Tensor  # (B, T) bool response mask
    hidden: Tensor | None  # (B, T, d) final-norm states at the response tokens (keep_hidden)
    head_hidden: Tensor | None  # (B, T, d) final-norm states that predict the response tokens (keep_hidden)


class ResponseForward:
    """Runs a model over rows of a rollout and reads log-probs, entropy and hidden states at their responses.

    Args:
        setup: the hardware layout: a ``lockstep`` one (FSDP) runs one forward per backward, so no shared prefix;
            under its gradient checkpointing HF drops the cache, so no shared prefix with grad either.
        temperature: the sampling temperature the log-probs are taken at (0, greedy, counts as 1).
        chunk_size: positions per vocabulary-projection chunk.
        micro_batch_size: rows per forward in the no-grad helpers (:meth:`logprobs`, :meth:`detached`,
            :meth:`hidden_states`).
    """

    def __init__(self, setup: Setup, temperature: float, chunk_size: int, micro_batch_size: int) -> None:
        self.setup = setup
        self.temperature = temperature or 1.0
        self.chunk_size = chunk_size
        self.micro_batch_size = micro_batch_size

    def __call__(
        self, model: nn.Module, rollout: RolloutBatch, rows: Tensor, keep_hidden: bool = False
    ) -> ForwardOutput:
        """Log-probs ``(B, T)``, entropy ``(B, T)``, response mask and (optionally) the final-norm hidden
        states ``(B, T, d)`` at the response positions of ``rows``, trimmed to the longest response."""
        response_mask = rollout.response_mask[rows]
        length = int(response_mask.sum(-1).max())
        prompt = rollout.prompt_length
        input_ids = rollout.input_ids[rows, : prompt + length]
        attention_mask = rollout.attention_mask[rows, : prompt + length]
        extra = rollout.forward_inputs(rows, prompt + length)
        family = family_of(model)
        position_ids = family.position_ids(attention_mask, extra)
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
        with capture_output(family.final_norm(model)) as captured:
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
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )
        if not keep_hidden:
            return ForwardOutput(logp, entropy, response_mask[:, :length], None, None)
        return ForwardOutput(logp, entropy, response_mask[:, :length], hidden[:, prompt - start :], head_hidden)

    def shares_prompt_prefix(self, rollout: RolloutBatch, extra: dict[str, Tensor]) -> bool:
        """Whether a forward encodes each prompt once for all its responses. Not with images (their rotary positions
        span the whole sequence), in a gradient-checkpointed forward with grad (HF then drops the cache: the
        replayed layers would write it twice) nor under a lockstep setup (FSDP expects one forward per backward)."""
        return (
            rollout.prompt_length > 1
            and rollout.prompt_index is not None
            and not extra
            and not (self.setup.gradient_checkpointing and torch.is_grad_enabled())
            and not self.setup.lockstep
        )

    @torch.no_grad()
    def logprobs(self, model: nn.Module, rollout: RolloutBatch, rows: Tensor | None = None) -> Tensor:
        """Log-probs of the responses of ``rows`` (default all) under ``model`` (no grad), ``(len(rows), T)``
        padded with zeros to the rollout's width."""
        device = rollout.input_ids.device
        rows = torch.arange(len(rollout), device=device) if rows is None else rows
        out = None
        for index in torch.arange(len(rows), device=device).split(self.micro_batch_size):
            logp, _, mask, _, _ = self(model, rollout, rows[index])
            if out is None:  # float32, or float64 for a float64 model
                out = logp.new_zeros(len(rows), rollout.response_mask.shape[1])
            out[index, : logp.shape[1]] = logp * mask
        return out if out is not None else torch.zeros(0, rollout.response_mask.shape[1], device=device)

    def detached(
        self, model: nn.Module, rollout: RolloutBatch, rows: Tensor, keep_hidden: bool = False
    ) -> Iterator[DetachedForward]:
        """The forward of ``model`` over ``rows`` without gradient, ``micro_batch_size`` rows at a time."""
        for part in rows.split(self.micro_batch_size) if len(rows) else ():
            with torch.no_grad():
                out = self(model, rollout, part, keep_hidden=keep_hidden)
            yield DetachedForward(part, out.logp, out.mask, out.hidden)

    @torch.no_grad()
    def hidden_states(self, model: nn.Module, rollout: RolloutBatch) -> list[tuple[Tensor, Tensor]]:
        """Final-norm hidden states at the response positions, without gradient, one ``(hidden, mask)`` pair per
        micro-batch."""
        pairs = []
        for rows in torch.arange(len(rollout), device=rollout.input_ids.device).split(self.micro_batch_size):
            _, _, mask, hidden, _ = self(model, rollout, rows, keep_hidden=True)
            pairs.append((hidden.detach(), mask))
        return pairs


def reference_kl(
    rollout: RolloutBatch,
    rows: Tensor,
    logp: Tensor,
    estimator: obj.KLEstimator,
    reference_logprobs: Callable[[Tensor], Tensor],
) -> Callable[[Tensor], Tensor]:
    """``PolicyForward.reference_kl`` of the micro-batch ``rows`` whose current log-probs are ``logp``: the per-token
    KL (:func:`relax_pl.objectives.kl_penalty`) of the rows a bool mask selects. Reference log-probs come from
    ``rollout.ref_logp`` when computed up front, else from ``reference_logprobs(rows)`` for the rows not seen yet
    (kept in ``rollout.ref_logp_of_rows``: PPO epochs that revisit a row do not run the reference again)."""

    def kl_of(selected: Tensor) -> Tensor:
        width = logp.shape[1]
        if rollout.ref_logp is not None:
            ref_logp = rollout.ref_logp[rows[selected], :width]
        else:
            known = rollout.ref_logp_of_rows
            wanted = rows[selected].tolist()
            missing = [row for row in wanted if row not in known]
            if missing:
                computed = reference_logprobs(torch.tensor(missing, device=rows.device))
                known.update(zip(missing, computed))
            ref_logp = torch.stack([known[row][:width] for row in wanted]) if wanted else logp.new_zeros(0, width)
        return obj.kl_penalty(logp[selected], ref_logp, estimator)

    return kl_of


@contextmanager
def capture_output(module: nn.Module) -> Iterator[list[Tensor]]:
    """Keep ``module``'s forward output (with its autograd graph) while the context is open."""
    captured: list[Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        yield captured
    finally:
        handle.remove()
