"""ReLaX callbacks: the exploration loss and the gated KL move what they should, the dictionary is training state,
and CLI fits run with the ReLaX callbacks and with each token-level baseline."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import relax_pl.callbacks.koopman_fit
from relax_pl.callbacks import KoopmanFit, LatentExploration
from relax_pl.callbacks.latent_exploration import CALIBRATION_KEY, latent_exploration_loss
from relax_pl.cli import main
from relax_pl.extension import PolicyForward
from relax_pl.koopman import KoopmanDictionary, dsd

from probes import tensorboard_logs, tiny_recipe


D_MODEL, M, N_MIN = 16, 4, 5
# Two prompts of three responses; row 5 is too short for a defined DSD (3 transitions < n_min).
ADVANTAGES = torch.tensor([1.0, 0.5, -1.5, 1.0, -1.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 1, 1, 1])


def fitted_koopman(seed: int = 0) -> KoopmanFit:
    fit = KoopmanFit(m=M, seed=seed)
    fit.set_weight(KoopmanDictionary(D_MODEL, M, seed=seed).proj.weight)
    fit.fitted = True
    return fit


def synthetic_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(6, 24, D_MODEL, generator=generator, dtype=torch.float64)
    mask = torch.ones(6, 24, dtype=torch.bool)
    mask[5, 4:] = False
    return hidden, mask


def loss_terms(explore: LatentExploration, fit: KoopmanFit, hidden, mask, kl=None):
    forward = PolicyForward(
        response_mask=mask, logp=torch.zeros(mask.shape), advantages=ADVANTAGES, group_index=GROUPS, hidden=hidden,
        reference_kl=None if kl is None else lambda selected: kl[selected],
    )
    return explore.policy_loss_terms(SimpleNamespace(callbacks=[fit, explore]), None, forward)


def test_descent_on_l_xp_raises_dsd_only_for_positive_ungated_responses():
    fit, (hidden0, mask) = fitted_koopman(), synthetic_batch()
    values, valid = dsd(hidden0, mask, fit.dictionary, n_min=N_MIN)
    assert valid.tolist() == [True] * 5 + [False]
    # xi between rows 0 and 3 (both A > 0): the larger one is over the bound, its encouragement suspended
    low, high = sorted([float(values[0]), float(values[3])])
    gated_row = 0 if float(values[0]) == high else 3
    free_row = 3 - gated_row
    explore = LatentExploration(xi_mode="absolute", xi=(low + high) / 2, kl_coef=0.0, n_min=N_MIN)
    hidden = torch.nn.Parameter(hidden0.clone())
    optimizer = torch.optim.SGD([hidden], lr=20.0)
    for step in range(5):
        optimizer.zero_grad()
        now, _ = dsd(hidden.detach(), mask, fit.dictionary, n_min=N_MIN)
        terms = loss_terms(explore, fit, hidden, mask)
        assert set(terms.losses) == {"relax/xp_loss"}
        terms.losses["relax/xp_loss"].backward()
        if step == 0:
            assert terms.metrics["relax/valid_frac"] == pytest.approx(5 / 6)
            assert terms.metrics["relax/dsd_mean"] == pytest.approx(float(values[:5].mean()))
            assert float(now[free_row]) < explore.xi < float(now[gated_row])
        # gradient exactly where A > 0, DSD is defined and not over xi (re-evaluated at every step); rows 2 and 4
        # (A <= 0), 5 (too short) and the over-dispersed gated_row get none
        moving = valid & (ADVANTAGES > 0) & (now <= explore.xi)
        assert (hidden.grad.abs().sum((1, 2)) > 0).tolist() == moving.tolist()
        optimizer.step()
    after, _ = dsd(hidden.detach(), mask, fit.dictionary, n_min=N_MIN)
    for row in (1, free_row):
        assert after[row] > values[row] * 1.01, (row, float(values[row]), float(after[row]))
    for row in (2, 4, 5, gated_row):
        assert after[row] == values[row]


def test_gated_kl_reaches_only_over_dispersed_responses():
    fit, (hidden, mask) = fitted_koopman(), synthetic_batch(seed=1)
    values, valid = dsd(hidden, mask, fit.dictionary, n_min=N_MIN)
    xi = float(values[valid].median())
    kl = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for positive_only in (True, False):
        expected = valid & (values > xi) & ((ADVANTAGES > 0) if positive_only else True)
        assert 0 < expected.sum() < valid.sum()
        explore = LatentExploration(xi_mode="absolute", xi=xi, kl_coef=0.5, gate_positive_only=positive_only, n_min=N_MIN)
        terms = loss_terms(explore, fit, hidden, mask, kl=kl)
        kl.grad = None
        terms.losses["relax/gated_kl_loss"].backward()
        assert (kl.grad.abs().sum(-1) > 0).tolist() == expected.tolist()
        manual = 0.5 * (kl.detach() * expected[:, None] * mask).sum() / mask.sum()
        torch.testing.assert_close(terms.losses["relax/gated_kl_loss"].detach(), manual)
        assert terms.metrics["relax/gated_frac"] == pytest.approx(float(expected.float().mean()))


def test_l_xp_is_log_mean_exp_over_each_groups_valid_responses():
    dispersion = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    advantages = torch.tensor([1.0, 2.0, 1.0, -1.0])
    none = torch.zeros(4, dtype=torch.bool)
    # group 1 has no valid response: it is left out of the mean over groups
    valid = torch.tensor([True, True, False, False])
    loss = latent_exploration_loss(dispersion, valid, none, advantages, groups)
    assert float(loss) == pytest.approx(math.log((math.exp(-1.0) + math.exp(-4.0)) / 2))
    # both groups: the second holds z = 3 (A = 1) and z = 0 (A < 0 is clipped)
    loss = latent_exploration_loss(dispersion, torch.ones(4, dtype=torch.bool), none, advantages, groups)
    second = math.log((math.exp(-3.0) + 1.0) / 2)
    assert float(loss) == pytest.approx((math.log((math.exp(-1.0) + math.exp(-4.0)) / 2) + second) / 2)
    assert float(latent_exploration_loss(dispersion, none, none, advantages, groups)) == 0.0


def test_quantile_and_relative_thresholds():
    fit, (hidden, mask) = fitted_koopman(), synthetic_batch()
    values, valid = dsd(hidden, mask, fit.dictionary, n_min=N_MIN)
    quantile = loss_terms(LatentExploration(xi_mode="quantile", xi_quantile=0.5, kl_coef=0.0, n_min=N_MIN), fit, hidden, mask)
    assert quantile.metrics["relax/xi"] == pytest.approx(float(values[valid].median()))
    relative = LatentExploration(xi_mode="relative", xi_scale=3.0, kl_coef=0.0, n_min=N_MIN)
    with pytest.raises(RuntimeError, match="not calibrated"):
        loss_terms(relative, fit, hidden, mask)
    fit.calibration[CALIBRATION_KEY] = 0.01
    assert loss_terms(relative, fit, hidden, mask).metrics["relax/xi"] == pytest.approx(0.03)


def test_dictionary_state_round_trip(tmp_path):
    fit = fitted_koopman(seed=3)
    fit.calibration[CALIBRATION_KEY] = 0.123
    torch.save(fit.state_dict(), tmp_path / "state.pt")
    restored = KoopmanFit(m=M)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.fitted and restored.calibration == {CALIBRATION_KEY: 0.123}
    assert torch.equal(restored.dictionary.proj.weight, fit.dictionary.proj.weight)
    assert not restored.dictionary.proj.weight.requires_grad
    with pytest.raises(ValueError, match="m=4"):
        KoopmanFit(m=5).load_state_dict(fit.state_dict())
    with pytest.raises(ValueError, match="KoopmanFit"):
        LatentExploration().setup(SimpleNamespace(callbacks=[]), None, "fit")


# ----------------------------------------------------------------------------------------- CLI fits
RELAX_CALLBACKS = [
    {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": M, "steps": 5, "lr": 1e-3}},
    {
        "class_path": "relax_pl.callbacks.LatentExploration",
        # the random model's rewards are all 0: gating on all valid responses lets the gated KL act
        "init_args": {"n_min": N_MIN, "xi_scale": 1.0, "kl_coef": 0.1, "gate_positive_only": False},
    },
    {"class_path": "relax_pl.callbacks.SpectrumMonitor", "init_args": {"every_n_steps": 1, "n_min": N_MIN}},
]


def recipe(folder: Path, model: Path, callbacks: list[dict], **objective) -> Path:
    return tiny_recipe(
        folder, model, callbacks, seed=3,
        model={"sampling": {"num_responses": 4, "max_new_tokens": 16, "temperature": 1.0}, "objective": objective},
        data={"task_options": {"digits": 1, "operations": "+", "num_samples": 8}},
    )


def test_relax_fit_logs_and_resume_does_not_refit(tmp_path, tiny_model, monkeypatch):
    config = recipe(tmp_path, tiny_model, RELAX_CALLBACKS)
    main(["fit", "--config", str(config)])
    scalars, images = tensorboard_logs(tmp_path)
    for tag in [
        "relax/xp_loss", "relax/gated_kl_loss", "relax/l_xp", "relax/xi", "relax/dsd_mean", "relax/dsd_p90",
        "relax/gated_frac", "timing_s/dsd", "timing_s/ref", "koopman/fit_loss_initial", "koopman/fit_loss_final",
        "koopman/cond_x", "koopman/saturated_fraction", "timing_s/koopman_fit", "koopman/dsd_mean",
    ]:
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert min(scalars["relax/valid_frac"]) > 0.5 and min(scalars["relax/xi"]) > 0
    # the random model's rewards are all 0, so only the gate on all valid responses can reach the KL; the
    # reference then runs during the update over the gated responses (logged as timing_s/ref)
    assert max(scalars["relax/gated_frac"]) > 0 and all(v >= 0 for v in scalars["relax/gated_kl"])
    assert all(v <= 0 for v in scalars["relax/l_xp"])  # log-mean-exp of -z with z >= 0
    assert len(scalars["koopman/fit_loss_final"]) == 1  # fitted once
    assert {"koopman/eigenvalues", "koopman/dsd_histogram"} <= images
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    state = first["callbacks"]["KoopmanFit"]
    assert state["fitted"] and state["weight"].shape == (M, 64) and state["calibration"][CALIBRATION_KEY] > 0

    monkeypatch.setattr(relax_pl.callbacks.koopman_fit, "fit_dictionary", lambda *a, **k: pytest.fail("refitted"))
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", "last"])
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["global_step"] == 3
    assert torch.equal(resumed["callbacks"]["KoopmanFit"]["weight"], state["weight"])
    assert resumed["callbacks"]["KoopmanFit"]["calibration"] == state["calibration"]


@pytest.mark.parametrize(
    "objective",
    [{"policy_loss": "ppo", "entropy_coef": 0.01}, {"policy_loss": "clip_cov"}, {"policy_loss": "kl_cov"}],
    ids=["entropy_bonus", "clip_cov", "kl_cov"],
)
def test_token_level_baselines_fit(tmp_path, tiny_model, objective):
    main(["fit", "--config", str(recipe(tmp_path, tiny_model, [], **objective))])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    scalars, _ = tensorboard_logs(tmp_path)
    assert len(scalars["actor/pg_loss"]) == 2 and all(math.isfinite(v) for v in scalars["actor/pg_loss"])
    assert all(math.isfinite(v) for v in scalars["actor/grad_norm"])
    if objective.get("entropy_coef"):  # the random model's rewards are all 0: only the bonus has a gradient
        assert all(v > 0 for v in scalars["actor/grad_norm"])
