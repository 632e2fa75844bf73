"""relax_pl.koopman against independent numpy references (docs/method.md sections 2-3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from relax_pl.koopman import KoopmanDictionary, dsd, fit_dictionary, koopman_eigenvalues, resdmd_residual

D, M, T, EPS = 10, 6, 40, 1e-3
LENGTHS = [40, 33, 13, 11]  # with n_min = 2m = 12 transitions: the last one (10 transitions) is invalid


def _batch(seed: int = 0, lengths: list[int] = LENGTHS, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(lengths), T, d, generator=gen, dtype=torch.float64)
    mask = torch.arange(T) < torch.tensor(lengths)[:, None]
    mask[1, 20] = False  # a hole: transitions 19->20 and 20->21 are not the response's own
    return hidden, mask


def _dictionary(d: int = D, m: int = M, seed: int = 0) -> KoopmanDictionary:
    return KoopmanDictionary(d, m, seed=seed).double()


def _numpy_dsd(hidden, mask, W, eps, n_min, compat=False):
    """Reference, one response at a time: ridge solve, numpy eigvals / svd, np.var."""
    hidden, mask, W = hidden.detach().numpy(), mask.numpy(), W.detach().numpy()
    longest = max(np.flatnonzero(row).max() + 1 for row in mask)
    values, valid = [], []
    for h, mk in zip(hidden, mask):
        own = np.flatnonzero(mk[:-1] & mk[1:])
        if len(own) < n_min:
            values.append(0.0), valid.append(False)
            continue
        if compat:  # zero-padded to the batch's longest response, padding rows included
            h, own = np.where(mk[:, None], h, 0.0), np.arange(longest - 1)
        g = 1.0 / (1.0 + np.exp(-h @ W.T))
        X, Y = g[own], g[own + 1]
        K = np.linalg.solve(X.T @ X + eps * np.eye(W.shape[0]), X.T @ Y)
        if compat:
            values.append(np.var(np.sqrt(np.linalg.svd(K, compute_uv=False) ** 2 + 1e-3), ddof=1))
        else:
            values.append(np.var(np.abs(np.linalg.eigvals(K)), ddof=0))
        valid.append(True)
    return np.array(values), np.array(valid)


@pytest.mark.parametrize("spectrum", ["eig", "sv_compat"])
def test_dsd_matches_numpy_reference(spectrum):
    hidden, mask = _batch()
    dictionary = _dictionary()
    values, valid = dsd(hidden, mask, dictionary, eps=EPS, spectrum=spectrum)
    ref, ref_valid = _numpy_dsd(hidden, mask, dictionary.proj.weight, EPS, 2 * M, compat=spectrum == "sv_compat")
    assert valid.tolist() == ref_valid.tolist() == [True, True, True, False]
    assert values.dtype == torch.float64 and values[3].item() == 0.0
    np.testing.assert_allclose(values[:3].detach().numpy(), ref[:3], rtol=1e-6)
    assert (ref[:3] > 1e-4).all()  # not trivially zero


@pytest.mark.parametrize("spectrum", ["eig", "sv_compat"])
def test_padding_garbage_changes_neither_values_nor_gradients(spectrum):
    hidden, mask = _batch()
    dictionary = _dictionary()
    garbage = 1e6 * torch.randn_like(hidden)
    garbage[0, -1, 0] = garbage[2, -1, 3] = float("nan")
    garbage[1, 20, :] = float("inf")  # the hole
    dirty = torch.where(mask[..., None], hidden, garbage)
    results = []
    for h in (torch.where(mask[..., None], hidden, 0.0), dirty):
        h = h.clone().requires_grad_(True)
        values, _ = dsd(h, mask, dictionary, spectrum=spectrum)
        values.sum().backward()
        results.append((values.detach(), h.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert torch.isfinite(results[1][1]).all()
    assert (results[1][1][~mask] == 0).all()


def test_invalid_responses_get_exactly_zero_gradient():
    hidden, mask = _batch()
    hidden.requires_grad_(True)
    values, valid = dsd(hidden, mask, _dictionary(), n_min=13)  # row 2 has exactly 12 transitions: invalid
    assert valid.tolist() == [True, True, False, False]
    assert values[2].item() == 0.0 and values[3].item() == 0.0
    values.sum().backward()
    assert (hidden.grad[2:] == 0).all()
    assert (hidden.grad[:2].abs().sum((1, 2)) > 0).all()


def test_n_min_below_floor_raises():
    hidden, mask = _batch()
    with pytest.raises(ValueError, match=r"n_min=6 is below the floor m\+1=7"):
        dsd(hidden, mask, _dictionary(), n_min=M)
    _, valid = dsd(hidden, mask, _dictionary(), n_min=M + 1)
    assert valid.all()


def test_bad_shapes_raise():
    hidden, mask = _batch()
    with pytest.raises(ValueError, match="mask"):
        dsd(hidden, mask.long(), _dictionary())
    with pytest.raises(ValueError, match="d=7"):
        dsd(hidden, mask, _dictionary(d=7))
    with pytest.raises(ValueError, match="'svd'"):
        dsd(hidden, mask, _dictionary(), spectrum="svd")


@pytest.mark.parametrize("spectrum", ["eig", "sv_compat"])
def test_gradcheck(spectrum):
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 12, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(12) < torch.tensor([12, 9])[:, None]
    dictionary = _dictionary(d=5, m=3, seed=1)

    def f(h):
        return dsd(h, mask, dictionary, n_min=4, spectrum=spectrum)[0]

    assert torch.autograd.gradcheck(f, (hidden,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_low_precision_lift():
    hidden, mask = _batch()
    dictionary = KoopmanDictionary(D, M, seed=0)  # float32 weights, bf16 hidden states
    h = hidden.to(torch.bfloat16).requires_grad_(True)
    values, valid = dsd(h, mask, dictionary)
    ref, _ = dsd(hidden, mask, _dictionary())  # the same draw in float64
    values.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and torch.isfinite(h.grad.float()).all()
    torch.testing.assert_close(values[valid], ref[valid], rtol=0.05, atol=1e-3)


def test_koopman_eigenvalues_match_numpy_and_are_detached():
    hidden, mask = _batch()
    dictionary = _dictionary()
    lam = koopman_eigenvalues(hidden.requires_grad_(True), mask, dictionary)
    assert lam.shape == (4, M) and lam.dtype == torch.complex128 and not lam.requires_grad
    assert torch.isnan(lam[3]).all()
    W = dictionary.proj.weight.detach().numpy()
    g = 1.0 / (1.0 + np.exp(-hidden[0].detach().numpy() @ W.T))
    K = np.linalg.solve(g[:-1].T @ g[:-1] + EPS * np.eye(M), g[:-1].T @ g[1:])
    ref = np.sort_complex(np.linalg.eigvals(K))
    np.testing.assert_allclose(np.sort_complex(lam[0].numpy()), ref, rtol=1e-8, atol=1e-10)
    values, _ = dsd(hidden, mask, dictionary)
    np.testing.assert_allclose(values[0].item(), np.var(np.abs(ref)), rtol=1e-10)


def test_resdmd_residual_matches_direct_definition():
    gen = torch.Generator().manual_seed(5)
    X, Y = torch.rand(2, 3, 30, 4, generator=gen, dtype=torch.float64)
    got = resdmd_residual(X, Y, EPS)
    for b in range(3):
        x, y = X[b].numpy(), Y[b].numpy()
        lam, V = np.linalg.eig(np.linalg.solve(x.T @ x + EPS * np.eye(4), x.T @ y))
        ref = sum(
            np.linalg.norm(y @ V[:, j] - lam[j] * x @ V[:, j]) ** 2 / np.linalg.norm(x @ V[:, j]) ** 2 for j in range(4)
        )
        np.testing.assert_allclose(got[b].item(), ref, rtol=1e-8)


def _linear_system_trajectories(n: int = 24, length: int = 64, d: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """x_{t+1} = A x_t + noise with A a damped rotation-rich orthogonal map."""
    gen = torch.Generator().manual_seed(seed)
    A = 0.97 * torch.linalg.qr(torch.randn(d, d, generator=gen))[0]
    trajectories = []
    for i in range(n):
        x, xs = torch.randn(d, generator=gen), []
        for _ in range(length + i % 5):  # variable lengths
            x = A @ x + 0.1 * torch.randn(d, generator=gen)
            xs.append(x)
        trajectories.append(torch.stack(xs))
    return trajectories


def test_fit_lowers_the_residual_and_freezes_the_dictionary():
    trajectories = _linear_system_trajectories()
    dictionary = KoopmanDictionary(16, 8, seed=0)
    w0 = dictionary.proj.weight.detach().clone()
    report = fit_dictionary(dictionary, trajectories, steps=40, lr=1e-3, batch_size=8)
    assert len(report.losses) == 40
    assert report.final_loss < 0.9 * report.initial_loss
    assert report.losses[-1] < report.losses[0]
    assert 1.0 <= report.cond_x < 1e6 and 0.0 <= report.saturated_fraction < 0.05 and report.seconds > 0
    assert not (dictionary.proj.weight == w0).all() and not dictionary.proj.weight.requires_grad


def test_fit_is_deterministic_given_the_seed():
    trajectories = _linear_system_trajectories(n=12, length=30)
    runs = []
    for seed in (0, 0, 1):
        dictionary = KoopmanDictionary(16, 8, seed=0)
        report = fit_dictionary(dictionary, trajectories, steps=5, batch_size=4, seed=seed)
        runs.append((report.losses, dictionary.proj.weight.clone()))
    assert runs[0][0] == runs[1][0] and torch.equal(runs[0][1], runs[1][1])
    assert runs[0][0] != runs[2][0]  # the seed drives the batch sampling


def test_fit_rejects_unusable_trajectories():
    with pytest.raises(ValueError, match=r"m\+1=9 transitions \(m=8\).*from 5 to 9 tokens"):
        fit_dictionary(KoopmanDictionary(16, 8), [torch.randn(5, 16), torch.randn(9, 16)])
    with pytest.raises(ValueError, match=r"trajectory 1 has shape \(20, 15\)"):
        fit_dictionary(KoopmanDictionary(16, 8), [torch.randn(20, 16), torch.randn(20, 15)])


def test_dictionary_init_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = KoopmanDictionary(576, 50, seed=7), KoopmanDictionary(576, 50, seed=7), KoopmanDictionary(576, 50, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a.proj.weight, b.proj.weight) and not torch.equal(a.proj.weight, c.proj.weight)
    assert a.proj.weight.std().item() == pytest.approx(0.5 / 576**0.5, rel=0.02)
    x = torch.randn(3, 576)
    torch.testing.assert_close(a(x), torch.sigmoid(x @ a.proj.weight.T))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dsd_on_cuda_matches_cpu():
    hidden, mask = _batch()
    dictionary = _dictionary()
    ref, _ = dsd(hidden, mask, dictionary)
    h = hidden.cuda().requires_grad_(True)
    values, valid = dsd(h, mask.cuda(), dictionary.cuda())
    values.sum().backward()
    assert values.device.type == "cuda" and valid.device.type == "cuda"
    torch.testing.assert_close(values.cpu(), ref, rtol=1e-9, atol=0)
    assert torch.isfinite(h.grad).all() and (h.grad[3] == 0).all()
