"""RepExp and effective-rank shaping beside ReLaX: their quantities against hand-computed values and the authors'
formulas (float64), each term acting on a tiny model, one shared hidden-state forward per step however many latent
callbacks run, the latent probes of SpectrumMonitor, and exact resume with every callback's state."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

import relax_pl.forward
from relax_pl.callbacks.effective_rank import effective_rank, rank_bonus, rank_dynamics, shaped_advantages
from relax_pl.callbacks.repexp import (
    PromptCovariance, RepExp, accumulated_leverage, bonus_shaped_advantages, group_leverage, mean_pooled,
    sparse_random_projection,
)
from relax_pl.callbacks.latent_exploration import disable_dropout
from relax_pl.callbacks.spectrum import update_reads_sampling_states
from relax_pl.checkpointing import load_checkpoint_file
from relax_pl.cli import main
from relax_pl.extension import RLVRCallback
from relax_pl.objectives import group_advantages

from probes import tensorboard_logs, tensorboard_run, tiny_recipe

LAM = 0.01


# ------------------------------------------------------------------------------------------------ RepExp
def sherman_morrison_bonus(features: torch.Tensor, lam: float) -> torch.Tensor:
    """The authors' order of operations for one group (their ``leverage`` reward, written here in our words): centre
    the group, fold each vector into ``(lam I)^{-1}`` by a Sherman-Morrison rank-1 update, then read ``c^T V^-1 c``."""
    centred = features - features.mean(0)
    inverse = torch.eye(features.shape[1], dtype=features.dtype) / lam
    for c in centred:
        c = c[:, None]
        inverse = inverse - inverse @ c @ c.T @ inverse / (1 + c.T @ inverse @ c)
    return torch.stack([c @ inverse @ c for c in centred])


def test_repexp_bonus_by_hand():
    # one group, 1-D features 0, 0, 3: centred -1, -1, 2, covariance lam + 6; the two alike responses share it
    bonus = group_leverage(torch.tensor([[0.0], [0.0], [3.0]], dtype=torch.float64), torch.tensor([0, 0, 0]), LAM)
    torch.testing.assert_close(bonus, torch.tensor([1 / 6.01, 1 / 6.01, 4 / 6.01], dtype=torch.float64))
    # two groups are measured apart: 0, 2 centred to -1, 1 (covariance lam + 2); the second group as above
    features = torch.tensor([[0.0], [2.0], [0.0], [0.0], [3.0]], dtype=torch.float64)
    bonus = group_leverage(features, torch.tensor([0, 0, 1, 1, 1]), LAM)
    torch.testing.assert_close(bonus[:2], torch.full((2,), 1 / 2.01, dtype=torch.float64))
    torch.testing.assert_close(bonus[2:], torch.tensor([1 / 6.01, 1 / 6.01, 4 / 6.01], dtype=torch.float64))


def test_repexp_bonus_matches_the_authors_sherman_morrison_fold():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 5, generator=generator, dtype=torch.float64) * 0.3
    groups = torch.arange(12) // 4
    ours = group_leverage(features, groups, LAM)
    theirs = torch.cat([sherman_morrison_bonus(features[groups == g], LAM) for g in range(3)])
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    assert ours.std() > 0.01  # the responses get different bonuses


def authors_persistent_fold(steps: list[torch.Tensor], lam: float) -> list[torch.Tensor]:
    """The authors' ``persist_covariance=True`` for one prompt over several steps, in our words: update the running
    mean, fold the uncentred vectors into the kept ``(lam I + S)^{-1}`` by Sherman-Morrison, remove ``n mu mu^T``
    with one more, and read the bonus of the step's vectors centred by the running mean."""
    inverse, mean, count, bonuses = torch.eye(steps[0].shape[1], dtype=torch.float64) / lam, None, 0, []
    for features in steps:
        n = features.shape[0]
        mean = features.mean(0) if mean is None else (mean * count + features.mean(0) * n) / (count + n)
        count += n
        for x in features:
            x = x[:, None]
            inverse = inverse - inverse @ x @ x.T @ inverse / (1 + x.T @ inverse @ x)
        mu = mean[:, None]
        adjusted = inverse - inverse @ mu @ mu.T @ inverse / (-1 / count + mu.T @ inverse @ mu)
        centred = features - mean
        bonuses.append(torch.stack([c @ adjusted @ c for c in centred]))
    return bonuses


def test_the_bonus_keeps_an_earlier_shaping_of_the_advantages():
    """RepExp's advantages are the GRPO ones of the bonus-shaped reward; an advantage shaping run before it
    (EffectiveRankShaping first in the recipe) stays, it was recomputed away before."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    bonus = torch.tensor([0.3, 0.1, 0.0, 0.2, 0.5, 0.1, 0.4, 0.0], dtype=torch.float64)
    plain = group_advantages(rewards, 4)
    expected = group_advantages(rewards + bonus.float(), 4)
    torch.testing.assert_close(bonus_shaped_advantages(plain, rewards, bonus, 4, scale=True), expected)
    earlier = shaped_advantages(plain, torch.tensor([0.4, 0.0, 2.0, 0.1, 0.0, 0.3, 0.0, 0.0]), kappa=2.0)
    assert not torch.equal(earlier, plain)
    torch.testing.assert_close(bonus_shaped_advantages(earlier, rewards, bonus, 4, scale=True),
                               expected + (earlier - plain))
    unscaled = group_advantages(rewards, 4, scale=False)  # Dr. GRPO's advantages: the difference unscaled too
    torch.testing.assert_close(bonus_shaped_advantages(unscaled, rewards, bonus, 4, scale=False),
                               group_advantages(rewards + bonus.float(), 4, scale=False))


def test_persistent_covariance_matches_the_authors_fold():
    generator = torch.Generator().manual_seed(1)
    steps = [torch.randn(4, 6, generator=generator, dtype=torch.float64) * 0.3 + 0.5 for _ in range(3)]
    state = PromptCovariance.empty(6)
    ours = [accumulated_leverage(features, state, LAM) for features in steps]
    for mine, theirs in zip(ours, authors_persistent_fold(steps, LAM)):
        torch.testing.assert_close(mine, theirs, rtol=1e-8, atol=1e-10)
    assert state.count == 12
    # a fresh state is the per-step bonus; a kept one is another (the past answers are in the covariance)
    torch.testing.assert_close(ours[0], group_leverage(steps[0], torch.zeros(4, dtype=torch.long), LAM))
    assert not torch.allclose(ours[2], group_leverage(steps[2], torch.zeros(4, dtype=torch.long), LAM))


def test_persistent_covariance_needs_one_projection():
    with pytest.raises(ValueError, match="redraw_projection: false"):
        RepExp(persist_covariance=True)


def test_mean_pooling_and_sparse_projection():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]], dtype=torch.float64)
    pooled = mean_pooled(hidden, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(pooled, torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    d, k = 400, 32
    projection = sparse_random_projection(d, k, torch.Generator().manual_seed(0))
    scale = 1 / math.sqrt(k / math.sqrt(d))  # 1 / sqrt(density * k), density = 1 / sqrt(d)
    assert projection.abs().unique().tolist() == [0.0, pytest.approx(scale)]
    assert abs(float((projection != 0).double().mean()) - 1 / math.sqrt(d)) < 0.01
    x = torch.randn(2000, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ratio = (x @ projection).square().sum(-1) / x.square().sum(-1)
    assert abs(float(ratio.mean()) - 1) < 0.1  # norms kept on average
    assert torch.equal(projection, sparse_random_projection(d, k, torch.Generator().manual_seed(0)))


# ------------------------------------------------------------------------------------------------ ER
def authors_effective_rank(states: torch.Tensor) -> torch.Tensor:
    """The authors' ``compute_single_effective_rank`` (full SVD) in our words: singular values of the centred
    states, normalised with a 1e-8 guard, exp of their entropy with ``log(p + 1e-8)``."""
    s = torch.linalg.svdvals(states - states.mean(0))
    p = s / (s.sum() + 1e-8)
    return torch.exp(-(p * torch.log(p + 1e-8)).sum())


def authors_rank_dynamics(states: torch.Tensor, stride: int, max_tokens: int) -> tuple[float, float]:
    """The authors' loop for ERV / ERA (``calculate_diffs_for_single_sample_optimized``) in our words: the rank of
    each prefix from the eigenvalues of its centred Gram matrix, each step against the mean of the earlier ones."""
    states = states[-max_tokens:]
    history, previous, diffs, diffs2 = [], None, [], []
    if states.shape[0] < 2 * stride:
        return 0.0, 0.0
    for t in range(stride, states.shape[0], stride):
        window = states[: t + 1]
        centred = window - window.mean(0)
        s = torch.linalg.eigvalsh(centred @ centred.T).clamp(min=0).sqrt()
        p = s / (s.sum() + 1e-8)
        current = float(torch.exp(-(p * torch.log(p + 1e-8)).sum()))
        if history:
            diff = current - sum(history) / len(history)
            diffs.append(diff)
            if previous is not None:
                diffs2.append(diff - previous)
            previous = diff
        history.append(current)
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return mean(diffs), mean(diffs2)


def test_effective_rank_by_hand():
    # centred columns orthogonal with norms sqrt(2), sqrt(2): p = (1/2, 1/2), ER = 2
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(effective_rank(z), torch.tensor(2.0, dtype=torch.float64))
    # norms sqrt(2), 2 sqrt(2): p = (1/3, 2/3)
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]], dtype=torch.float64)
    expected = math.exp(-(1 / 3 * math.log(1 / 3) + 2 / 3 * math.log(2 / 3)))
    torch.testing.assert_close(effective_rank(z), torch.tensor(expected, dtype=torch.float64))
    assert float(effective_rank(z[:1])) == 0.0  # one token: no spread


def test_rank_velocity_and_acceleration_by_hand():
    # stride 1 over e1, -e1, e2, -e2: prefixes of 2, 3, 4 tokens. [e1, -e1] has one direction (E0 = 1);
    # [e1, -e1, e2] centred has orthogonal columns of norms sqrt(2) and sqrt(2/3); all four give E2 = 2
    z = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], dtype=torch.float64)
    p = math.sqrt(2) / (math.sqrt(2) + math.sqrt(2 / 3))
    e1 = math.exp(-(p * math.log(p) + (1 - p) * math.log(1 - p)))
    d1, d2 = e1 - 1.0, 2.0 - (1.0 + e1) / 2
    er, erv, era = rank_dynamics(z, stride=1, max_tokens=512).tolist()
    assert er == pytest.approx(2.0) and erv == pytest.approx((d1 + d2) / 2) and era == pytest.approx(d2 - d1)
    assert erv != 0 and era != 0


@pytest.mark.parametrize("length, stride", [(37, 4), (64, 8), (15, 8), (9, 3)])
def test_effective_rank_terms_match_the_authors_formulas(length, stride):
    states = torch.randn(length, 24, generator=torch.Generator().manual_seed(length), dtype=torch.float64)
    states = states.cumsum(0) * 0.1  # correlated over time, as hidden states are
    torch.testing.assert_close(effective_rank(states), authors_effective_rank(states), rtol=1e-6, atol=1e-6)
    er, erv, era = rank_dynamics(states, stride=stride, max_tokens=32).tolist()
    theirs_erv, theirs_era = authors_rank_dynamics(states, stride, 32)
    # the authors' 1e-8 guards and the square roots of a rank-deficient Gram matrix's zero eigenvalues move the
    # rank by ~1e-6
    assert erv == pytest.approx(theirs_erv, rel=1e-5, abs=1e-6) and era == pytest.approx(theirs_era, rel=1e-5, abs=1e-6)
    assert erv != 0 or length < 2 * stride


def test_rank_bonus_and_shaped_advantages_by_hand():
    values = torch.tensor([[12.0, 0.5, 0.2], [8.0, -0.5, -0.4]], dtype=torch.float64)
    reference = torch.tensor([10.0, 1.0, -0.1], dtype=torch.float64)
    bonus = rank_bonus(values, reference, gain=2.0, weight=1.0)
    for i, (u_er, u_erv, u_era) in enumerate([(0.2, -0.5, 3.0), (-0.2, -1.5, -3.0)]):
        beta = 1 / (1 + math.exp(-2.0 * u_era))
        assert float(bonus[i]) == pytest.approx(beta * math.tanh(u_er) + (1 - beta) * math.tanh(u_erv))
    # deviations are clipped at +-5: ER 100 against 10 counts as 5
    clipped = rank_bonus(torch.tensor([[100.0, 1.0, -0.1]], dtype=torch.float64), reference, 2.0, 1.0)
    assert float(clipped[0]) == pytest.approx(0.5 * math.tanh(5.0))
    advantages = torch.tensor([1.0, -1.0, 0.5, 0.0])
    shaped = shaped_advantages(advantages, torch.tensor([2.0, 1.0, -1.0, 3.0], dtype=torch.float64), kappa=2.0)
    torch.testing.assert_close(shaped, torch.tensor([1.5, -0.5, 0.5, 0.0]))


# ------------------------------------------------------------------------------------------------ fits
RELAX = [
    {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": 4, "steps": 5, "lr": 1e-3}},
    {"class_path": "relax_pl.callbacks.LatentExploration",
     "init_args": {"alpha": 1.0, "n_min": 5, "xi_mode": "relative", "xi_scale": 1.0, "kl_coef": 0.0}},
]
REPEXP = [{"class_path": "relax_pl.callbacks.RepExp", "init_args": {"beta": 0.5, "representation": "policy"}}]
ER = [{"class_path": "relax_pl.callbacks.EffectiveRankShaping", "init_args": {"stride": 2, "max_tokens": 16}}]
MONITOR = [
    {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": 4, "steps": 5, "lr": 1e-3}},
    {"class_path": "relax_pl.callbacks.SpectrumMonitor", "init_args": {"every_n_steps": 2, "n_min": 5}},
]


def fit_recipe(
    folder: Path, model: Path, callbacks: list[dict], max_steps: int = 2, ppo_epochs: int = 1, data: dict | None = None
) -> Path:
    """Tiny fits whose rewards differ within groups (accuracy = even length, format = has a digit), so advantages,
    correct / incorrect splits and every shaping term are non-zero."""
    return tiny_recipe(
        folder, model, callbacks, seed=2,
        trainer={"max_steps": max_steps},
        model={
            "reward": {"class_path": "probes.ParityAccuracyReward"},
            "sampling": {"num_responses": 4, "max_new_tokens": 16, "temperature": 1.0},
            "update": {"micro_batch_size": 4, "ppo_epochs": ppo_epochs},
            "optimizer": {"lr": 1e-3},
        },
        data=data or {"task_options": {"digits": 1, "operations": "+", "num_samples": 8}},
    )


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(folder / "checkpoints" / "last.ckpt")["state_dict"]


def weight_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def grpo(tmp_path_factory, tiny_model) -> Path:
    folder = tmp_path_factory.mktemp("grpo")
    main(["fit", "--config", str(fit_recipe(folder, tiny_model, []))])
    return folder


REPEXP_PRETRAINED = [{"class_path": "relax_pl.callbacks.RepExp", "init_args": {"beta": 0.5}}]


@pytest.mark.parametrize(
    "callbacks, metric",
    [
        (REPEXP, "repexp/advantage_change"),
        (REPEXP_PRETRAINED, "repexp/advantage_change"),
        (ER, "er/advantage_change"),
    ],
    ids=["repexp_policy", "repexp_pretrained", "effective_rank"],
)
def test_each_method_changes_the_update(tmp_path, tiny_model, grpo, callbacks, metric):
    """The term is non-zero on the steps it acts on and the same seed without it trains to other weights."""
    main(["fit", "--config", str(fit_recipe(tmp_path, tiny_model, callbacks))])
    scalars, _ = tensorboard_logs(tmp_path)
    assert scalars[metric] and all(v > 0 for v in scalars[metric]), scalars.get(metric)
    if metric.startswith("repexp"):
        assert all(v > 0 for v in scalars["repexp/bonus_mean"]) and len(scalars[metric]) == 2  # every step
        # the default reads the frozen pre-trained model: one reference forward a step; "policy" the shared read
        assert ("timing_s/ref" in scalars) == (callbacks is REPEXP_PRETRAINED)
    else:
        assert len(scalars[metric]) == 1 and scalars["er/shaped_frac"][0] > 0  # from the second step
        assert all(v > 0 for v in scalars["er/effective_rank"]) and any(v != 0 for v in scalars["er/erv"])
    assert weight_change(final_weights(tmp_path), final_weights(grpo)) > 1e-6


class ForwardCounter(RLVRCallback):
    """Counts the policy forwards of each step (every ResponseForward call: these fits have no reference model)."""

    counts: list[int] = []

    def on_train_batch_start(self, *args) -> None:
        ForwardCounter.counts.append(0)


def count_forwards(folder: Path, model: Path, callbacks: list[dict], ppo_epochs: int = 1) -> list[int]:
    """Policy forwards per step of a fit with ``callbacks`` (``ResponseForward`` must be counting)."""
    ForwardCounter.counts = []
    probe = [{"class_path": "test_latent_methods.ForwardCounter"}]
    main(["fit", "--config", str(fit_recipe(folder, model, probe + callbacks, ppo_epochs=ppo_epochs))])
    return list(ForwardCounter.counts)


def test_one_hidden_state_forward_however_many_latent_callbacks(tmp_path, tiny_model, monkeypatch):
    """ReLaX + RepExp + ER (+ the probes) run per step exactly the forwards of the most demanding of them alone:
    8 responses in micro-batches of 4 are 2 forwards for the update and 2 for the shared no-grad read."""
    original = relax_pl.forward.ResponseForward.__call__

    def counted(self, *args, **kwargs):
        ForwardCounter.counts[-1] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(relax_pl.forward.ResponseForward, "__call__", counted)
    alone = {
        name: count_forwards(tmp_path / name, tiny_model, callbacks)
        for name, callbacks in [("grpo", []), ("relax", RELAX), ("repexp", REPEXP), ("er", ER)]
    }
    together = count_forwards(tmp_path / "all", tiny_model, RELAX + REPEXP + ER + MONITOR[1:])
    assert alone["grpo"] == [2, 2]
    assert alone["relax"] == [4, 2]  # KoopmanFit reads the first rollout once
    assert alone["repexp"] == alone["er"] == [4, 4]
    assert together == [max(counts[step] for counts in alone.values()) for step in range(2)] == [4, 4]
    # two epochs (two optimiser steps: max_steps 2 is one RL step) need the old policy's log-probs: GRPO reads them
    # in a forward of their own, ER's shared read gives them (2 + 2 x 2 forwards, not 2 + 2 + 2 x 2)
    assert count_forwards(tmp_path / "grpo_epochs", tiny_model, [], ppo_epochs=2) == [6]
    assert count_forwards(tmp_path / "er_epochs", tiny_model, ER, ppo_epochs=2) == [6]
    scalars, _ = tensorboard_logs(tmp_path / "er_epochs")
    assert "timing_s/old" not in scalars and "timing_s/old" in tensorboard_logs(tmp_path / "grpo_epochs")[0]


def test_relax_measuring_ahead_reads_the_shared_forward(tmp_path, tiny_model, monkeypatch):
    """A quantile bound over micro-batches of 4 measures all 8 rows ahead of the update: from the second step (the
    first fits the dictionary on that very forward) the shared read gives those DSDs, so ReLaX + RepExp + ER + the
    probes again run the forwards of the most demanding alone, and the update's DSDs agree with the shared read's."""
    original = relax_pl.forward.ResponseForward.__call__

    def counted(self, *args, **kwargs):
        ForwardCounter.counts[-1] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(relax_pl.forward.ResponseForward, "__call__", counted)
    quantile = [RELAX[0], {**RELAX[1], "init_args": {**RELAX[1]["init_args"], "xi_mode": "quantile",
                                                     "xi_quantile": 0.5}}]
    alone = count_forwards(tmp_path / "relax", tiny_model, quantile)
    assert alone == [6, 4]  # 2 shared (the fit) + 2 ahead + 2 update; then 2 shared (ahead) + 2 update
    together = count_forwards(tmp_path / "all", tiny_model, quantile + REPEXP + ER + MONITOR[1:])
    assert together == [6, 4]  # not 6, 6: one shared read serves every callback
    scalars, _ = tensorboard_logs(tmp_path / "all")
    assert len(scalars["relax/lookahead_dsd_gap"]) == 2 and max(scalars["relax/lookahead_dsd_gap"]) < 1e-4
    assert max(scalars["relax/gated_frac"]) > 0  # the bound from the shared read gates


def test_latent_probes_in_a_grpo_run(tmp_path, tiny_model):
    """SpectrumMonitor in a run without a loss term: per-step DSD in both spectra, effective rank and RepExp
    novelty, over all, correct and incorrect responses, and the spectrum image on its steps only."""
    main(["fit", "--config", str(fit_recipe(tmp_path, tiny_model, MONITOR, max_steps=3))])
    scalars, images = tensorboard_logs(tmp_path)
    for probe in ["dsd_eig", "dsd_sv", "effective_rank", "repexp_novelty"]:
        for split in ["all", "correct", "incorrect"]:
            assert f"probes/{probe}/{split}" in scalars, sorted(scalars)
        assert len(scalars[f"probes/{probe}/all"]) == 3  # every step
        assert all(v > 0 for v in scalars[f"probes/{probe}/all"])
    assert all(0 < v < 1 for v in scalars["probes/correct_frac"]) and "timing_s/probes" in scalars
    assert {"koopman/eigenvalues", "koopman/dsd_histogram"} <= images
    assert not any(name.startswith("relax/") for name in scalars)  # no loss term


def test_latent_probes_read_from_the_update_cost_no_forward_and_agree(tmp_path, tiny_model, monkeypatch):
    """read_from="update": the probes read the update's forward instead of a no-grad forward of their own. One
    optimiser step per rollout (micro-batches of 4, one epoch): the same weights and rows, so the same probes (up to
    float rounding), and only the first step's forward for KoopmanFit's dictionary fit is left."""
    original = relax_pl.forward.ResponseForward.__call__

    def counted(self, *args, **kwargs):
        ForwardCounter.counts[-1] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(relax_pl.forward.ResponseForward, "__call__", counted)
    from_update = [MONITOR[0], {**MONITOR[1], "init_args": {**MONITOR[1]["init_args"], "read_from": "update"}}]
    from_rollout = [MONITOR[0], {**MONITOR[1], "init_args": {**MONITOR[1]["init_args"], "read_from": "rollout"}}]
    assert count_forwards(tmp_path / "rollout", tiny_model, from_rollout) == [4, 4]
    assert count_forwards(tmp_path / "update", tiny_model, from_update) == [4, 2]  # GRPO alone: [2, 2]
    assert count_forwards(tmp_path / "auto", tiny_model, MONITOR) == [4, 2]  # the default reads the update here
    _, expected = tensorboard_run(tmp_path / "rollout")
    _, read = tensorboard_run(tmp_path / "update")
    assert tensorboard_logs(tmp_path / "update")[1] == tensorboard_logs(tmp_path / "rollout")[1]  # the images
    probes = sorted(name for name in expected if name.startswith("probes/") and name != "probes/correct_frac")
    assert len(probes) >= 12
    for name in probes + ["probes/correct_frac", "koopman/dsd_mean"]:
        assert [step for step, _ in read[name]] == [step for step, _ in expected[name]] == [0, 1], name
        assert [v for _, v in read[name]] == pytest.approx([v for _, v in expected[name]], rel=1e-4), name
    assert weight_change(final_weights(tmp_path / "update"), final_weights(tmp_path / "rollout")) == 0.0


def test_the_probes_read_the_update_only_where_it_sees_the_sampling_policys_states():
    policy = torch.nn.Sequential(torch.nn.Linear(2, 2))
    module = SimpleNamespace(update=SimpleNamespace(mini_batch_size=None), policy=policy)
    assert update_reads_sampling_states(module, rows=8)
    module.update.mini_batch_size = 8
    assert update_reads_sampling_states(module, rows=8)
    module.update.mini_batch_size = 4  # the second mini-batch's rows pass after an optimiser step
    assert not update_reads_sampling_states(module, rows=8)
    module.update.mini_batch_size = None
    module.policy = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.05))  # a LoRA adapter's, say
    assert not update_reads_sampling_states(module, rows=8)
    attention = torch.nn.Linear(2, 2)
    attention.attention_dropout = 0.1  # as a Hugging Face attention module keeps it
    module.policy = torch.nn.Sequential(attention)
    assert not update_reads_sampling_states(module, rows=8)
    assert disable_dropout(module.policy) == ["attention_dropout=0.1 x 1"] and update_reads_sampling_states(module, 8)


def test_repexp_persistent_covariance_is_kept_and_resumed(tmp_path, tiny_model):
    """persist_covariance on two prompts seen at every step: each prompt's sums hold every response sampled for it,
    they are saved in the checkpoint, and one step then a resume ends where two steps in one go do. Step 2's bonus
    reads step 1's answers, so the run ends on other weights than the per-step covariance's."""
    persistent = [{"class_path": "relax_pl.callbacks.RepExp", "init_args": {
        "beta": 0.5, "representation": "policy", "persist_covariance": True, "redraw_projection": False}}]
    per_step = [{"class_path": "relax_pl.callbacks.RepExp", "init_args": {
        "beta": 0.5, "representation": "policy", "redraw_projection": False}}]
    two_prompts = {"task_options": {"digits": 1, "operations": "+", "num_samples": 2}, "batch_size": 2}

    def recipe(folder: Path, callbacks: list[dict], max_steps: int = 2) -> Path:
        return fit_recipe(folder, tiny_model, callbacks, max_steps=max_steps, data=two_prompts)

    main(["fit", "--config", str(recipe(tmp_path / "straight", persistent))])
    main(["fit", "--config", str(recipe(tmp_path / "per_step", per_step))])
    split = recipe(tmp_path / "split", persistent, max_steps=1)
    main(["fit", "--config", str(split)])
    halfway = load_checkpoint_file(tmp_path / "split" / "checkpoints" / "last.ckpt")["callbacks"]["RepExp"]
    assert len(halfway["keys"]) == 2 and halfway["count"].tolist() == [4, 4]
    main(["fit", "--config", str(split), "--trainer.max_steps", "2", "--ckpt_path", "last"])
    a = load_checkpoint_file(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert a["callbacks"]["RepExp"]["count"].tolist() == [8, 8]  # both steps' answers of each prompt
    for key in ("scatter", "total", "count"):
        assert torch.equal(a["callbacks"]["RepExp"][key], b["callbacks"]["RepExp"][key]), key
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    assert weight_change(a["state_dict"], final_weights(tmp_path / "per_step")) > 1e-7


def test_resume_is_exact_with_every_latent_callback(tmp_path, tiny_model):
    """ReLaX (alpha steered to a grad_share target) + RepExp + ER + probes: two steps in one go and one step then a
    resume end on the same weights and callback states. ER's moving averages and ReLaX's alpha are set after step 1
    and shape step 2, so a resume that lost them would train step 2 otherwise."""
    steered = {**RELAX[1], "init_args": {**RELAX[1]["init_args"], "grad_share_target": 0.01}}
    callbacks = [RELAX[0], steered] + REPEXP + ER + MONITOR[1:]
    straight = tmp_path / "straight"
    main(["fit", "--config", str(fit_recipe(straight, tiny_model, callbacks))])
    split = tmp_path / "split"
    recipe = fit_recipe(split, tiny_model, callbacks, max_steps=1)
    main(["fit", "--config", str(recipe)])
    halfway = load_checkpoint_file(split / "checkpoints" / "last.ckpt")
    assert halfway["callbacks"]["EffectiveRankShaping"]["reference"] is not None
    assert halfway["callbacks"]["LatentExploration"]["alpha"] != 1.0  # the controller steered alpha on step 1
    main(["fit", "--config", str(recipe), "--trainer.max_steps", "2", "--ckpt_path", "last"])
    a = load_checkpoint_file(straight / "checkpoints" / "last.ckpt")
    b = load_checkpoint_file(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2
    for name in a["state_dict"]:
        assert torch.equal(a["state_dict"][name], b["state_dict"][name]), name
    for callback in ["EffectiveRankShaping", "KoopmanFit", "LatentExploration"]:
        for key, value in a["callbacks"][callback].items():
            other = b["callbacks"][callback][key]
            if key == "report":  # the fit's report holds its wall time
                value, other = ({k: v for k, v in r.items() if not k.startswith("timing_s/")} for r in (value, other))
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (callback, key)
    assert weight_change(b["state_dict"], halfway["state_dict"]) > 1e-6  # the resumed step trained


@pytest.mark.parametrize("recipe", ["repexp_small.yaml", "effective_rank_small.yaml"])
def test_the_latent_arms_recipes_run_relax_smalls_task_model_and_update(recipe):
    """A side-by-side comparison changes one thing: the latent method's callbacks (the arms drifted apart once:
    these validated on the training split's distribution, relax_small on the held-out problems)."""
    recipes = Path(__file__).parents[1] / "recipes"
    base, arm = (yaml.safe_load((recipes / name).read_text()) for name in ("relax_small.yaml", recipe))
    for key in ("seed_everything", "model", "data"):
        assert arm[key] == base[key], key
    run_folders = {"default_root_dir", "logger", "callbacks"}
    assert {k: v for k, v in arm["trainer"].items() if k not in run_folders} == \
        {k: v for k, v in base["trainer"].items() if k not in run_folders}
