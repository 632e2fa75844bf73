"""ReLaX callbacks: the exploration loss and the gated KL move what they should, the dictionary is training state,
and CLI fits run with the ReLaX callbacks and with each token-level baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import relax_pl.callbacks.koopman_fit
from relax_pl.callbacks import KoopmanFit, LatentExploration
from relax_pl.callbacks.latent_exploration import latent_exploration_loss
from relax_pl.cli import main
from relax_pl.extension import PolicyForward
from relax_pl.koopman import KoopmanDictionary, dsd
from relax_pl.models import load_causal_lm

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
    """The callback's terms for one batch that is the whole mini-batch (its metrics: ``explore.step_metrics()``)."""
    explore.on_train_batch_start(None)
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
    explore = LatentExploration(xi_mode="absolute", xi=(low + high) / 2, kl_coef=0.0, n_min=N_MIN, spectrum="eig")
    hidden = torch.nn.Parameter(hidden0.clone())
    optimizer = torch.optim.SGD([hidden], lr=20.0)
    for step in range(5):
        optimizer.zero_grad()
        now, _ = dsd(hidden.detach(), mask, fit.dictionary, n_min=N_MIN)
        terms = loss_terms(explore, fit, hidden, mask)
        assert set(terms.losses) == {"relax/xp_loss"}
        terms.losses["relax/xp_loss"].backward()
        if step == 0:
            metrics = explore.step_metrics()
            assert metrics["relax/valid_frac"] == pytest.approx(5 / 6)
            assert metrics["relax/dsd_mean"] == pytest.approx(float(values[:5].mean()))
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
    values, valid = dsd(hidden, mask, fit.dictionary, n_min=N_MIN, spectrum="eig")
    xi = float(values[valid].median())
    kl = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2), requires_grad=True)
    for positive_only in (True, False):
        expected = valid & (values > xi) & ((ADVANTAGES > 0) if positive_only else True)
        assert 0 < expected.sum() < valid.sum()
        explore = LatentExploration(
            xi_mode="absolute", xi=xi, kl_coef=0.5, gate_positive_only=positive_only, n_min=N_MIN, spectrum="eig"
        )
        terms = loss_terms(explore, fit, hidden, mask, kl=kl)
        kl.grad = None
        terms.losses["relax/gated_kl_loss"].backward()
        assert (kl.grad.abs().sum(-1) > 0).tolist() == expected.tolist()
        manual = 0.5 * (kl.detach() * expected[:, None] * mask).sum() / mask.sum()
        torch.testing.assert_close(terms.losses["relax/gated_kl_loss"].detach(), manual)
        assert explore.step_metrics()["relax/gated_frac"] == pytest.approx(float(expected.float().mean()))


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
    quantile = LatentExploration(xi_mode="quantile", xi_quantile=0.5, kl_coef=0.0, n_min=N_MIN, spectrum="eig")
    loss_terms(quantile, fit, hidden, mask)
    assert quantile.step_metrics()["relax/xi"] == pytest.approx(float(values[valid].median()))
    relative = LatentExploration(xi_mode="relative", xi_scale=3.0, kl_coef=0.0, n_min=N_MIN, spectrum="eig")
    with pytest.raises(RuntimeError, match="not calibrated"):
        loss_terms(relative, fit, hidden, mask)
    relative.calibrated_median = 0.01
    loss_terms(relative, fit, hidden, mask)
    assert relative.step_metrics()["relax/xi"] == pytest.approx(0.03)


def test_state_round_trips(tmp_path):
    fit = fitted_koopman(seed=3)
    torch.save(fit.state_dict(), tmp_path / "state.pt")
    restored = KoopmanFit(m=M)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.fitted
    assert torch.equal(restored.dictionary.proj.weight, fit.dictionary.proj.weight)
    assert not restored.dictionary.proj.weight.requires_grad
    with pytest.raises(ValueError, match="m=4"):
        KoopmanFit(m=5).load_state_dict(fit.state_dict())
    with pytest.raises(ValueError, match="KoopmanFit"):
        LatentExploration().setup(SimpleNamespace(callbacks=[]), None, "fit")
    explore = LatentExploration(xi_mode="relative")
    explore.calibrated_median = 0.123
    torch.save(explore.state_dict(), tmp_path / "explore.pt")
    again = LatentExploration(xi_mode="relative")
    again.load_state_dict(torch.load(tmp_path / "explore.pt", weights_only=True))
    assert again.calibrated_median == 0.123


def test_l_xp_shares_over_a_split_group_add_up_to_the_whole_group_loss():
    """Paper Eq. 10 over whole groups: cut a batch of two groups (one of them with an invalid response) into
    micro-batches every which way; the shares add up to the whole-batch L_xp in value and in gradient."""
    generator = torch.Generator().manual_seed(0)
    dispersion = torch.rand(7, generator=generator, dtype=torch.float64) * 3
    valid = torch.tensor([True, True, True, False, True, True, True])
    over = torch.tensor([False, True, False, False, False, False, False])
    advantages = torch.tensor([1.0, 2.0, -1.0, 0.5, 0.7, -0.3, 1.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1])

    def value_and_grad(parts):
        leaf = dispersion.clone().requires_grad_()
        z = advantages.clamp(min=0) * torch.where(over, leaf.detach(), leaf).detach()
        count = torch.zeros(2, dtype=torch.long).index_add_(0, groups, valid.long())
        total = 0.0
        for rows in parts:
            rows = torch.tensor(rows)
            others = torch.ones(7, dtype=torch.bool)
            others[rows] = False
            candidates = (groups[rows][:, None] == groups[None, :]) & (others & valid)[None, :]
            outside = torch.where(candidates, -z[None, :], -math.inf).logsumexp(-1)
            total = total + latent_exploration_loss(
                leaf[rows], valid[rows], over[rows], advantages[rows], groups[rows],
                outside_log_sum=outside, group_valid_count=count[groups[rows]], num_groups=2,
            )
        (grad,) = torch.autograd.grad(total, leaf)
        return float(total), grad

    whole_value, whole_grad = value_and_grad([list(range(7))])
    a = advantages.clamp(min=0)
    expected = 0.0
    for g in (0, 1):
        members = (groups == g) & valid
        z = a[members] * dispersion[members]
        expected += float(torch.logsumexp(-z, 0) - math.log(int(members.sum()))) / 2
    assert whole_value == pytest.approx(expected, rel=1e-12)
    assert whole_grad[1] == 0 and whole_grad[3] == 0 and whole_grad[2] == 0  # over xi, invalid, A < 0
    for parts in ([[0], [1, 2], [3, 4], [5, 6]], [[0, 1, 2, 3, 4], [5, 6]], [[i] for i in range(7)]):
        value, grad = value_and_grad(parts)
        assert value == pytest.approx(whole_value, rel=1e-12), parts
        torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_gated_kl_shares_of_a_split_mini_batch_add_up_to_the_whole_batch_value(loss_agg_mode):
    """The gated KL is aggregated with the mini-batch's normaliser, as the policy loss is: cut the mini-batch into
    micro-batches every which way and the shares add up to the whole-batch value (a micro-batch's own normaliser
    would not: only the slow end-to-end invariance test caught that)."""
    fit, (hidden, mask) = fitted_koopman(), synthetic_batch()
    mask[1, 20:] = False  # responses of different lengths: token-mean and seq-mean-token-mean differ
    values, valid = dsd(hidden, mask, fit.dictionary, n_min=N_MIN, spectrum="eig")
    xi = float(values[valid].median())
    kl = torch.rand(mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * mask
    normaliser = float(mask.sum()) if loss_agg_mode == "token-mean" else float(len(mask))

    def gated_kl(parts: list[list[int]]) -> float:
        explore = LatentExploration(alpha=0.0, xi=xi, kl_coef=0.5, gate_positive_only=False, n_min=N_MIN,
                                    spectrum="eig")
        explore.on_train_batch_start(None)
        total = 0.0
        for part in parts:
            rows = torch.tensor(part)
            forward = PolicyForward(
                response_mask=mask[rows], logp=torch.zeros(mask[rows].shape, dtype=torch.float64),
                advantages=ADVANTAGES[rows], group_index=GROUPS[rows], hidden=hidden[rows], rows=rows,
                loss_agg_mode=loss_agg_mode, normaliser=normaliser, mini_batch_responses=len(mask),
                reference_kl=lambda selected, rows=rows: kl[rows][selected],
            )
            terms = explore.policy_loss_terms(SimpleNamespace(callbacks=[fit, explore]), None, forward)
            total += float(terms.losses["relax/gated_kl_loss"])
        return total

    gate = valid & (values > xi)
    assert 0 < int(gate.sum()) < int(valid.sum())  # some responses gated, some not
    per_response = (kl * mask).sum(-1) / (mask.sum(-1) if loss_agg_mode == "seq-mean-token-mean" else 1)
    expected = 0.5 * float(per_response[gate].sum()) / normaliser
    whole = gated_kl([list(range(6))])
    assert whole == pytest.approx(expected, rel=1e-12) and whole > 0
    for parts in ([[0], [1, 2], [3, 4], [5]], [[0, 1, 2, 3], [4, 5]], [[i] for i in range(6)]):
        assert gated_kl(parts) == pytest.approx(whole, rel=1e-12), parts


def test_a_group_without_valid_response_does_not_reweight_the_others():
    dispersion = torch.tensor([0.5, 0.7, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 1, 1])
    valid = torch.tensor([False, False, True, True])
    none = torch.zeros(4, dtype=torch.bool)
    whole = latent_exploration_loss(dispersion, valid, none, advantages, groups)
    # micro-batch 1 holds only the invalid group: it adds nothing, and group 1's share is not halved
    first = latent_exploration_loss(dispersion[:2], valid[:2], none[:2], advantages[:2], groups[:2], num_groups=1)
    second = latent_exploration_loss(dispersion[2:], valid[2:], none[2:], advantages[2:], groups[2:], num_groups=1)
    assert float(first) == 0.0
    assert float(first + second) == pytest.approx(float(whole)) == pytest.approx(math.log((math.exp(-1.0) + 1.0) / 2))


# ----------------------------------------------------------------------------------------- CLI fits
RELAX_CALLBACKS = [
    {"class_path": "relax_pl.callbacks.KoopmanFit", "init_args": {"m": M, "steps": 5, "lr": 1e-3}},
    {
        "class_path": "relax_pl.callbacks.LatentExploration",
        "init_args": {"alpha": 1.0, "n_min": N_MIN, "xi_mode": "relative", "xi_scale": 1.0, "kl_coef": 0.1,
                      "gate_positive_only": False},
    },
    {"class_path": "relax_pl.callbacks.SpectrumMonitor", "init_args": {"every_n_steps": 1, "n_min": N_MIN}},
]


def recipe(folder: Path, model: Path, callbacks: list[dict], update: dict | None = None, **objective) -> Path:
    """Two RL steps of the tiny model with a reward that differs within groups (so advantages, and every term
    that depends on them, are non-zero)."""
    return tiny_recipe(
        # seed 3: every step has a row with A > 0 and a DSD under xi (with seed 2 step 2 has none since the data
        # iterators stopped drawing from the sampling generator, and a term with nothing to push would pass the
        # tests below unchecked)
        folder, model, callbacks, seed=3,
        model={
            "reward": {"class_path": "probes.LengthParityReward"},
            "sampling": {"num_responses": 4, "max_new_tokens": 16, "temperature": 1.0},
            "objective": objective,
            "update": {"micro_batch_size": 4, **(update or {})},
            "optimizer": {"lr": 1e-3},
        },
        data={"task_options": {"digits": 1, "operations": "+", "num_samples": 8}},
    )


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def weight_change(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model):
    """The plain GRPO run every other fit here is compared with: same seed, same rollouts at step 1."""
    folder = tmp_path_factory.mktemp("grpo")
    main(["fit", "--config", str(recipe(folder, tiny_model, []))])
    return folder


def test_grpo_baseline_trains(grpo_run, tiny_model):
    start = {f"policy.{k}": v for k, v in load_causal_lm(str(tiny_model)).state_dict().items()}
    assert weight_change(final_weights(grpo_run), start) > 1e-4
    scalars, _ = tensorboard_logs(grpo_run)
    assert min(scalars["critic/advantages/abs_mean"]) > 0 and min(scalars["actor/grad_norm"]) > 0


def test_relax_fit_logs_changes_the_update_and_resume_does_not_refit(tmp_path, tiny_model, grpo_run, monkeypatch):
    config = recipe(tmp_path, tiny_model, RELAX_CALLBACKS)
    main(["fit", "--config", str(config)])
    scalars, images = tensorboard_logs(tmp_path)
    for tag in [
        "relax/xp_loss", "relax/gated_kl_loss", "relax/l_xp", "relax/xi", "relax/dsd_mean", "relax/dsd_p90",
        "relax/gated_frac", "relax/grad_share", "timing_s/dsd", "timing_s/ref", "koopman/fit_loss_initial",
        "koopman/fit_loss_final", "koopman/cond_x", "koopman/saturated_fraction", "timing_s/koopman_fit",
        "koopman/dsd_mean",
    ]:
        assert tag in scalars, f"{tag} not logged; got {sorted(scalars)}"
    assert min(scalars["relax/valid_frac"]) > 0.5 and min(scalars["relax/xi"]) > 0
    # both ReLaX terms acted: some responses had A > 0 and a DSD under xi, some were over it
    assert all(v != 0 for v in scalars["relax/xp_loss"]) and all(v < 0 for v in scalars["relax/l_xp"])
    assert max(scalars["relax/gated_frac"]) > 0 and max(scalars["relax/gated_kl_loss"]) > 0
    assert min(scalars["relax/grad_share"]) > 0  # the exploration term pushed the hidden states in every step
    assert len(scalars["koopman/fit_loss_final"]) == 1  # fitted once
    assert {"koopman/eigenvalues", "koopman/dsd_histogram"} <= images
    # the same seed without LatentExploration's terms trains to other weights
    assert weight_change(final_weights(tmp_path), final_weights(grpo_run)) > 1e-5
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    state = first["callbacks"]["KoopmanFit"]
    assert state["fitted"] and state["weight"].shape == (M, 64)
    calibrated = first["callbacks"]["LatentExploration"]["calibrated_median"]
    assert calibrated > 0

    monkeypatch.setattr(relax_pl.callbacks.koopman_fit, "fit_dictionary", lambda *a, **k: pytest.fail("refitted"))
    main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", "last"])
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 3
    assert torch.equal(resumed["callbacks"]["KoopmanFit"]["weight"], state["weight"])
    assert resumed["callbacks"]["LatentExploration"]["calibrated_median"] == calibrated
    assert weight_change(resumed["state_dict"], first["state_dict"]) > 1e-5


def loss(name: str, **init_args) -> dict:
    return {"policy_loss": {"class_path": f"relax_pl.losses.{name}", "init_args": init_args}}


@pytest.mark.parametrize(
    "objective, update, without, metric",
    [
        ({"entropy_coef": 0.05}, {}, {}, None),
        (loss("ClipCov", ratio=0.05, bounds=[0.0, 100.0]), {}, loss("PPOClip"), "actor/cov_selected_frac"),
        (loss("KLCov", ratio=0.05, coef=1.0), {"ppo_epochs": 2}, loss("KLCov", ratio=0.05, coef=0.0),
         "actor/cov_selected_frac"),
        # in one on-policy pass with equal lengths GSPO's update is PPO's: the second epoch tells them apart
        (loss("GSPO"), {"ppo_epochs": 2}, loss("PPOClip"), "actor/pg_clipfrac"),
        (loss("CISPO", clip_high=0.01), {"ppo_epochs": 2}, loss("PPOClip", clip_high=0.01), "actor/is_weight_clipfrac"),
    ],
    ids=["entropy_bonus", "clip_cov", "kl_cov", "gspo", "cispo"],
)
def test_token_level_baselines_act(tmp_path, tiny_model, grpo_run, objective, update, without, metric):
    """Each baseline trains and its own term changes the update: the same run with the term switched off (same
    seed) ends with other weights; a policy loss logs its own statistic."""
    main(["fit", "--config", str(recipe(tmp_path / "with", tiny_model, [], update, **objective))])
    scalars, _ = tensorboard_logs(tmp_path / "with")
    assert all(math.isfinite(v) for v in scalars["actor/pg_loss"]) and min(scalars["actor/grad_norm"]) > 0
    if metric == "actor/cov_selected_frac":
        assert min(scalars[metric]) > 0
    elif metric is not None:
        assert metric in scalars
    baseline = grpo_run
    if without:
        main(["fit", "--config", str(recipe(tmp_path / "without", tiny_model, [], update, **without))])
        baseline = tmp_path / "without"
    assert weight_change(final_weights(tmp_path / "with"), final_weights(baseline)) > 1e-6


# ----------------------------------------------------------------------------------------- strength under control
def test_alpha_controller_reaches_the_target_and_stays_in_bounds():
    from relax_pl.callbacks.latent_exploration import AlphaController

    controller = AlphaController(target=0.1, bounds=(0.01, 5.0), rate=1.0)
    # grad_share is proportional to alpha: with a sensitivity of 2 per unit alpha, 0.05 reaches the target at once
    assert controller.update(alpha=0.5, share=1.0) == pytest.approx(0.05)
    assert controller.update(alpha=0.05, share=0.0) == 0.05  # nothing could move: alpha and state unchanged
    assert controller.sensitivity == 2.0
    assert AlphaController(0.1, (0.01, 5.0)).update(alpha=0.5, share=1e-6) == 5.0  # bounded above
    assert AlphaController(0.1, (0.01, 5.0)).update(alpha=0.5, share=1e3) == 0.01  # and below
    smoothed = AlphaController(target=0.1, bounds=(0.01, 5.0), rate=0.3)
    smoothed.update(0.5, 1.0)
    assert smoothed.update(0.05, 0.2) == pytest.approx(0.1 / (0.7 * 2.0 + 0.3 * 4.0))  # a running mean of s
    with pytest.raises(ValueError, match="grad_share_target > 0"):
        LatentExploration(grad_share_target=0.0)


def test_grad_share_target_steers_alpha_and_resumes_exactly(tmp_path, tiny_model):
    """A tiny model starts with an alpha 100x too weak: grad_share starts far below the target and comes to it
    while the weights move; the controller's state is in the checkpoint and a resumed run continues from it."""
    target = 0.5
    callbacks = [
        RELAX_CALLBACKS[0],
        {"class_path": "relax_pl.callbacks.LatentExploration",
         "init_args": {"alpha": 0.001, "grad_share_target": target, "alpha_bounds": [1e-4, 5.0], "n_min": N_MIN,
                       "kl_coef": 0.0}},
    ]
    config = recipe(tmp_path, tiny_model, callbacks)
    main(["fit", "--config", str(config), "--trainer.max_steps", "4"])
    scalars, _ = tensorboard_logs(tmp_path)
    shares, alphas = scalars["relax/grad_share"], scalars["relax/alpha"]
    assert len(shares) == len(alphas) == 4 and alphas[0] == pytest.approx(0.001)
    assert shares[0] < target / 10  # far off at the start
    assert all(abs(math.log(s / target)) < abs(math.log(shares[0] / target)) / 2 for s in shares[1:])
    assert alphas[-1] > 10 * alphas[0]
    start = {f"policy.{k}": v for k, v in load_causal_lm(str(tiny_model)).state_dict().items()}
    first = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert weight_change(first["state_dict"], start) > 1e-4  # the weights moved
    state = first["callbacks"]["LatentExploration"]
    assert state["alpha"] > 10 * 0.001 and state["sensitivity"] > 0

    main(["fit", "--config", str(config), "--trainer.max_steps", "5", "--ckpt_path", "last"])
    scalars, _ = tensorboard_logs(tmp_path)
    assert scalars["relax/alpha"][-1] == pytest.approx(state["alpha"])  # step 5 runs with the saved alpha


# ----------------------------------------------------------------------------------------- lockstep look-ahead
class SplitRollout:
    """What LatentExploration.on_mini_batch_start reads of a rollout: 2 prompts x 4 responses of 24 tokens."""

    def __init__(self, short_rows: list[int]) -> None:
        self.group_size = 4
        self.group_index = torch.arange(8) // 4
        self.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5] * 2)
        self.response_mask = torch.ones(8, 24, dtype=torch.bool)
        self.response_mask[short_rows, 3:] = False  # 2 transitions: no DSD

    def __len__(self) -> int:
        return 8


def lookahead_on_rank(rank: int, short_rows: list[list[int]], out: str) -> None:
    """One of two gloo ranks: a mini-batch whose groups micro-batches of 2 split, with this rank's short rows. Each
    look-ahead forward runs a collective, as an FSDP forward's all-gathers do."""
    import json
    from datetime import timedelta

    from relax_pl.extension import DetachedForward, MiniBatch

    # a rendezvous file, not a port another process could take; a long timeout for a loaded machine
    torch.distributed.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2,
                                         timeout=timedelta(seconds=120))
    hidden = torch.randn(8, 24, D_MODEL, generator=torch.Generator().manual_seed(rank))
    collectives = []

    def forward(rows, keep_hidden):
        for part in rows.split(2):
            torch.distributed.all_reduce(torch.ones(1))  # every rank must get here as often
            collectives.append(len(part))
            yield DetachedForward(part, torch.zeros(len(part), 24), rollout.response_mask[part], hidden[part])

    rollout = SplitRollout(short_rows[rank])
    mini_batch = MiniBatch.cut(rollout, torch.arange(8), 2, "token-mean", forward)
    fit, explore = fitted_koopman(), LatentExploration(alpha=1.0, n_min=N_MIN, kl_coef=0.0)
    module = SimpleNamespace(model_setup=SimpleNamespace(lockstep=True), sampling=SimpleNamespace(max_new_tokens=24))
    explore.on_train_batch_start(None)
    explore.on_mini_batch_start(SimpleNamespace(callbacks=[fit, explore]), module, mini_batch)
    known = explore._mini.known
    assert known.isnan().tolist() == [i in short_rows[rank] for i in range(8)]  # padding results were not kept
    Path(out, f"rank{rank}.json").write_text(json.dumps(collectives))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_split_groups_under_lockstep_run_as_many_lookahead_forwards_on_every_rank(tmp_path):
    """Rank 0 has 8 rows with a DSD to measure ahead (4 forwards of 2), rank 1 only 5 (3 forwards): rank 1 pads its
    rows to 8, so the sharded forwards' collectives pair up instead of hanging, and keeps only its own results."""
    import json

    torch.multiprocessing.spawn(lookahead_on_rank, args=([[], [1, 2, 6]], str(tmp_path)), nprocs=2)
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert counts == [[2, 2, 2, 2], [2, 2, 2, 2]]  # rank 1: its 5 valid rows and 3 padding rows


def test_split_groups_with_a_lora_adapter_measure_the_same_dsd_ahead_and_in_the_update(tmp_path, tiny_model):
    """A LoRA adapter with dropout 0.05 and micro-batches of 2 that split groups of 4: the DSDs measured ahead and in
    the update's forward of the same rows agree (LatentExploration switches the dropout off; with it on, they
    differed by 0.0045 at step 2, 1.6% of the mean DSD), the term acts and the adapter trains."""
    lora = {"class_path": "relax_pl.setups.LoRA", "init_args": {"rank": 4, "alpha": 8, "dropout": 0.05}}
    callbacks = [RELAX_CALLBACKS[0], {"class_path": "relax_pl.callbacks.LatentExploration",
                                      "init_args": {"alpha": 1.0, "n_min": N_MIN, "kl_coef": 0.0}}]
    config = recipe(tmp_path, tiny_model, callbacks, update={"micro_batch_size": 2})
    cli = main(["fit", "--config", str(config), "--model.setup", json.dumps(lora)])
    assert not [m for m in cli.model.policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    scalars, _ = tensorboard_logs(tmp_path)
    gaps = scalars["relax/lookahead_dsd_gap"]
    assert len(gaps) == 2 and max(gaps) < 1e-6, gaps  # measured: 6.7e-16 and 8.9e-16
    assert min(scalars["relax/grad_share"]) > 0
    adapter = {k: v for k, v in final_weights(tmp_path).items() if "lora_B" in k}
    assert adapter and max(float(v.abs().max()) for v in adapter.values()) > 0  # lora_B starts at 0: it trained


def test_failure_weighting_scales_each_groups_term_by_its_share_of_failures():
    dispersion = torch.tensor([0.5, 0.7, 1.0, 2.0, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    advantages = torch.tensor([1.0, 0.5, -1.5, 1.0, -0.5, -0.5], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    valid, none = torch.ones(6, dtype=torch.bool), torch.zeros(6, dtype=torch.bool)
    rewards = torch.tensor([1.0, 0.9, 0.1, 1.0, 0.0, 0.1])  # group 0: 1 of 3 failed, group 1: 2 of 3
    explore = LatentExploration(failure_weighting=True, failure_threshold=0.5)
    weight = explore.failure_shares(rewards, groups)
    assert weight.tolist() == pytest.approx([1 / 3] * 3 + [2 / 3] * 3)
    per_group = [latent_exploration_loss(dispersion[g], valid[g], none[g], advantages[g], groups[g]) for g in
                 (slice(0, 3), slice(3, 6))]  # each alone: G = 1
    weighted = latent_exploration_loss(dispersion, valid, none, advantages, groups, group_weight=weight)
    assert float(weighted) == pytest.approx((float(per_group[0]) / 3 + 2 * float(per_group[1]) / 3) / 2)
    # split in two micro-batches, the shares still add up in value and gradient
    (whole,) = torch.autograd.grad(weighted, dispersion)
    z = advantages.clamp(min=0) * dispersion.detach()
    outside = torch.tensor([float(torch.logsumexp(-z[1:3], 0)), -math.inf, -math.inf,
                            -math.inf, float(torch.logsumexp(-z[3:5], 0)), float(torch.logsumexp(-z[3:5], 0))],
                           dtype=torch.float64)
    count = torch.full((6,), 3)
    first = latent_exploration_loss(dispersion[:1], valid[:1], none[:1], advantages[:1], groups[:1],
                                    outside_log_sum=outside[:1], group_valid_count=count[:1], num_groups=2,
                                    group_weight=weight[:1])
    rest = latent_exploration_loss(dispersion[1:5], valid[1:5], none[1:5], advantages[1:5], groups[1:5],
                                   outside_log_sum=-z[[0, 0, 5, 5]],
                                   group_valid_count=count[1:5], num_groups=2, group_weight=weight[1:5])
    last = latent_exploration_loss(dispersion[5:], valid[5:], none[5:], advantages[5:], groups[5:],
                                   outside_log_sum=outside[5:], group_valid_count=count[5:], num_groups=2,
                                   group_weight=weight[5:])
    assert float(first + rest + last) == pytest.approx(float(weighted))
    (split,) = torch.autograd.grad(first + rest + last, dispersion)
    assert torch.allclose(split, whole) and whole[0] != 0
