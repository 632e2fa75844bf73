"""Koopman latent dynamics for ReLaX: dictionary, DMD operator, spectrum, DSD and the dictionary fit.

Pure math, no Lightning. Equations are those of the paper (arXiv 2512.07558) as settled in
docs/method.md sections 2-3: ridge DMD in float64, eigenvalue spectrum, population variance, each
response on its own transitions, and a compatibility mode reproducing the authors' pre-release code.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Spectrum = Literal["eig", "sv_compat"]


class KoopmanDictionary(nn.Module):
    """Koopman observables ``g(x) = sigmoid(x W)``, ``W`` in R^{d x m}, no bias (paper Sec. 3.2).

    ``W`` is drawn from its own generator seeded with ``seed`` (the global RNG is neither used nor advanced):
    uniform with std ``0.5 / sqrt(d)``, the distribution of the authors' pre-release code
    (``kaiming_uniform_(a=sqrt(7))``). Pre-activations then have std ``0.5 * rms(x)``, inside the sigmoid's
    unsaturated range for unit-RMS hidden states. A fit at the paper's lr 1e-4 moves ``W`` by a fraction of its
    size (15% in 50 steps on synthetic data), so this draw largely defines the function space DSD lives in.

    Args:
        d: hidden size of the policy (final-norm output).
        m: number of observables (paper: 50).
        seed: seed of the initial draw.
    """

    def __init__(self, d: int, m: int = 50, seed: int = 0) -> None:
        super().__init__()
        if d < 1 or m < 1:
            raise ValueError(f"KoopmanDictionary needs d >= 1 and m >= 1, got d={d}, m={m}")
        # meta: skip nn.Linear's default init, which would draw from (and advance) the global RNG
        self.proj = nn.Linear(d, m, bias=False, device="meta")
        bound = math.sqrt(3.0 / (4.0 * d))
        weight = torch.empty(m, d).uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed))
        self.proj.weight = nn.Parameter(weight)

    def forward(self, x: Tensor) -> Tensor:
        # The lift runs in x's dtype (bf16 hidden states stay bf16): one (N x d)(d x m) matmul.
        return torch.sigmoid(F.linear(x, self.proj.weight.to(x.dtype)))


def ridge_operator(gram: Tensor, cross: Tensor, eps: float) -> Tensor:
    """Ridge DMD operator ``K = solve(X^T X + eps I, X^T Y)`` (paper Eq. 5 with a ridge) from ``gram = X^T X`` and
    ``cross = X^T Y``, batched over leading dimensions. Solved by Cholesky: ``X^T X + eps I`` is symmetric
    positive definite for any ``eps > 0``."""
    if eps <= 0:
        raise ValueError(f"eps must be > 0 (ridge of X^T X), got {eps}")
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.cholesky_solve(cross, torch.linalg.cholesky(gram + eps * eye))


def spectrum_magnitudes(K: Tensor, spectrum: Spectrum = "eig") -> Tensor:
    """Magnitudes whose variance is DSD (paper Eq. 6): ``|lambda|`` of ``K Phi = Phi Lambda`` ("eig"), or the
    authors' pre-release ``sqrt(S^2 + 1e-3)`` over the singular values S of K ("sv_compat")."""
    if spectrum == "eig":
        return torch.linalg.eigvals(K).abs()
    if spectrum == "sv_compat":
        return torch.sqrt(torch.linalg.svdvals(K).square() + 1e-3)
    raise ValueError(f"spectrum must be 'eig' or 'sv_compat', got {spectrum!r}")


def _snapshots(g: Tensor, pairs: Tensor) -> tuple[Tensor, Tensor]:
    """Snapshots ``X = g(x_t)``, ``Y = g(x_{t+1})`` in float64 from the lifted (B, T, m) ``g`` (rows are time,
    docs/method.md section 2); rows of transitions outside ``pairs`` (B, T-1) are exactly zero, so they add
    nothing to any Gram matrix."""
    g, keep = g.double(), pairs[..., None]
    return torch.where(keep, g[:, :-1], 0.0), torch.where(keep, g[:, 1:], 0.0)


def resolve_n_min(m: int, n_min: Optional[int]) -> int:
    """The fewest own transitions a response needs for a defined DSD: ``n_min`` (default 2m), never below m+1."""
    n_min = 2 * m if n_min is None else n_min
    if n_min < m + 1:
        raise ValueError(f"n_min={n_min} is below the floor m+1={m + 1}: with fewer transitions K is rank-deficient")
    return n_min


def has_dsd(mask: Tensor, m: int, n_min: Optional[int] = None) -> Tensor:
    """(B,) bool: which responses have a defined DSD, i.e. at least ``n_min`` own transitions (pairs t, t+1 both
    in ``mask``). Depends on the lengths only, so it is known before any forward."""
    own = mask[:, :-1] & mask[:, 1:]
    return own.sum(-1) >= resolve_n_min(m, n_min)


def _valid_operators(
    hidden: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    eps: float,
    n_min: Optional[int],
    spectrum: Spectrum,
    padded_length: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Ridge K of every response with at least ``n_min`` own transitions, and the (B,) validity mask."""
    if spectrum not in ("eig", "sv_compat"):
        raise ValueError(f"spectrum must be 'eig' or 'sv_compat', got {spectrum!r}")
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(
            f"hidden must be (B, T, d) and mask (B, T) bool; got hidden {tuple(hidden.shape)}, "
            f"mask {tuple(mask.shape)} {mask.dtype}"
        )
    d, m = dictionary.proj.in_features, dictionary.proj.out_features
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match the dictionary's d={d}")
    valid = has_dsd(mask, m, n_min)
    # where, not multiplication: garbage (even NaN) in unmasked slots must reach neither the lift nor a gradient
    lifted = dictionary(torch.where(mask[..., None], hidden, 0.0))
    if spectrum == "sv_compat":
        # authors' layout: every response zero-padded to one length (verl pads responses to the maximum response
        # length), each padded slot lifting to g(0) = 0.5 whatever W is, and every pair of rows a transition
        length = int(padded_length) if padded_length is not None else int((mask * torch.arange(1, mask.shape[1] + 1, device=mask.device)).amax())
        if length > lifted.shape[1]:
            padding = lifted.new_full((lifted.shape[0], length - lifted.shape[1], m), 0.5)
            lifted = torch.cat([lifted, padding], dim=1)
        lifted = lifted[:, :length]
        pairs = torch.ones(lifted.shape[0], max(length - 1, 0), dtype=torch.bool, device=mask.device)
    else:
        pairs = mask[:, :-1] & mask[:, 1:]  # each response's own consecutive tokens
    X, Y = _snapshots(lifted, pairs)
    # Invalid rows leave before the m x m algebra: their hidden states get exactly zero gradient, and their
    # rank-deficient K (a repeated zero eigenvalue, where eigvals has no derivative) never reaches eigvals.
    X, Y = X[valid], Y[valid]
    return ridge_operator(X.transpose(-1, -2) @ X, X.transpose(-1, -2) @ Y, eps), valid


def dsd(
    hidden: Tensor,
    mask: Tensor,
    dictionary: KoopmanDictionary,
    *,
    eps: float = 1e-3,
    n_min: Optional[int] = None,
    spectrum: Spectrum = "eig",
    padded_length: Optional[int] = None,
) -> tuple[Tensor, Tensor]:
    """Dynamic Spectral Dispersion ``DSD(x) = Var(|Lambda|)`` per response (paper Eq. 6), differentiable in ``hidden``.

    "eig": population variance (ddof=0) of the eigenvalue magnitudes of the ridge K built from each response's
    own transitions (pairs t, t+1 both in ``mask``). "sv_compat": the authors' pre-release code, for comparison
    with the paper's figures and its xi = 25: ``sqrt(S^2 + 1e-3)`` of K's singular values, ddof=1, every response
    zero-padded to ``padded_length`` positions before the lift, every consecutive pair a transition (the ridge K
    is the same: the authors' code also solves ``X^T X + 1e-3 I``). Pass the sampling limit
    (``max_new_tokens``): verl, which the authors' code extends, pads responses to it, and a fixed length keeps a
    response's DSD independent of which other responses share its batch. Validity, from each response's own
    transitions, is the same in both modes (docs/method.md, "Spectrum and units").

    Args:
        hidden: (B, T, d) final-norm hidden states at response positions; unmasked slots may hold anything.
        mask: (B, T) bool, True on each response's tokens.
        dictionary: the (frozen) Koopman dictionary.
        eps: ridge of ``X^T X``.
        n_min: fewest own transitions for a defined DSD (default 2m, floor m+1).
        spectrum: "eig" or "sv_compat".
        padded_length: "sv_compat" only; default: the longest response of ``mask`` (depends on the batch).

    Returns:
        ``(values, valid)``: (B,) float64 DSD on ``hidden``'s device, 0.0 where invalid (those rows get no
        gradient; 0 rather than NaN so that sums and masked means stay finite), and the (B,) bool validity.
        The gradient is finite for diagonalisable K (repetitive responses included); next to a defective K
        (two eigenvalues colliding) it grows like 1/gap, which the policy's gradient clipping bounds.

    Raises:
        ValueError: on mismatched shapes or ``n_min < m + 1``.
    """
    K, valid = _valid_operators(hidden, mask, dictionary, eps, n_min, spectrum, padded_length)
    values = torch.zeros(hidden.shape[0], dtype=torch.float64, device=hidden.device)
    if K.shape[0] == 0:
        return values, valid
    # many small LAPACK problems run ~7x faster on the host than on a GPU; autograd follows .cpu()
    magnitudes = spectrum_magnitudes(K.cpu(), spectrum)
    dispersion = magnitudes.var(dim=-1, correction=1 if spectrum == "sv_compat" else 0)
    return values.index_put((valid.nonzero().squeeze(-1),), dispersion.to(hidden.device)), valid


@torch.no_grad()
def koopman_eigenvalues(
    hidden: Tensor, mask: Tensor, dictionary: KoopmanDictionary, eps: float = 1e-3, *, n_min: Optional[int] = None
) -> Tensor:
    """Detached Koopman spectrum, (B, m) complex128 eigenvalues of each valid response's ridge K (for plots);
    rows of invalid responses are NaN."""
    K, valid = _valid_operators(hidden, mask, dictionary, eps, n_min, "eig")
    out = torch.full((hidden.shape[0], K.shape[-1]), complex("nan+nanj"), dtype=torch.complex128, device=hidden.device)
    out[valid] = torch.linalg.eigvals(K.cpu()).to(hidden.device)
    return out


def resdmd_residual(X: Tensor, Y: Tensor, eps: float) -> Tensor:
    """Normalised ResDMD residual per trajectory, ``sum_j ||Y v_j - lambda_j X v_j||^2 / ||X v_j||^2``
    (docs/method.md section 3; paper Eq. 8), evaluated on m x m Gram matrices as in supp. Eq. 12:
    ``v^H (Y^T Y - lambda Y^T X - conj(lambda) X^T Y + |lambda|^2 X^T X) v / v^H X^T X v``.
    The eigenpairs of the ridge K are computed without gradient, so only the lift moves; normalising by
    ``||X v_j||^2`` removes the trivial minimiser of saturated, near-constant features."""
    Xt = X.transpose(-1, -2)
    G, A, L = Xt @ X, Xt @ Y, Y.transpose(-1, -2) @ Y
    with torch.no_grad():
        lam, V = torch.linalg.eig(ridge_operator(G, A, eps).cpu())
        lam, V = lam.to(X.device), V.to(X.device)

    def quadratic(M: Tensor) -> Tensor:  # v_j^H M v_j for every column v_j of V
        return (V.conj() * (M.to(V.dtype) @ V)).sum(-2)

    xv = quadratic(G).real
    cross = (lam * quadratic(A.transpose(-1, -2))).real  # Re(lambda v^H Y^T X v); the conj term is its conjugate
    residual = quadratic(L).real - 2 * cross + lam.abs().square() * xv
    # floor: an exactly collinear pair of saturated features gives X v = 0 for one eigenvector
    return (residual / xv.clamp_min(1e-30)).sum(-1)


@dataclass
class FitReport:
    """Outcome of :func:`fit_dictionary`. Losses are the mean normalised ResDMD residual per trajectory;
    ``initial_loss``/``final_loss`` are over all fitted trajectories, ``losses`` over each step's batch."""

    losses: list[float]
    initial_loss: float
    final_loss: float
    cond_x: float
    saturated_fraction: float
    seconds: float


def _pad(trajectories: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Zero-padded (N, T_max, d) stack of (T_i, d) trajectories and its (N, T_max) token mask."""
    hidden = nn.utils.rnn.pad_sequence(trajectories, batch_first=True)
    lengths = torch.tensor([t.shape[0] for t in trajectories], device=hidden.device)
    return hidden, torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]


@torch.no_grad()
def _evaluate(
    dictionary: KoopmanDictionary, hidden: Tensor, mask: Tensor, eps: float, chunk: int
) -> tuple[float, float, float]:
    """Mean residual, median cond(X) and saturated fraction (g < 0.01 or > 0.99) over all trajectories."""
    losses, conds, saturated = [], [], 0
    for i in range(0, hidden.shape[0], chunk):
        g, tokens = dictionary(hidden[i : i + chunk]), mask[i : i + chunk]
        X, Y = _snapshots(g, tokens[:, :-1] & tokens[:, 1:])
        losses.append(resdmd_residual(X, Y, eps))
        conds.append(torch.linalg.cond(X))  # zero rows leave the singular values unchanged
        saturated += int(((g < 0.01) | (g > 0.99))[tokens].sum())
    features = int(mask.sum()) * dictionary.proj.out_features
    return torch.cat(losses).mean().item(), torch.cat(conds).median().item(), saturated / features


def fit_dictionary(
    dictionary: KoopmanDictionary,
    trajectories: list[Tensor],
    *,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 64,
    eps: float = 1e-3,
    seed: int = 0,
) -> FitReport:
    """Fit ``W`` by Adam on the normalised ResDMD residual (docs/method.md section 3; paper Algorithm 1,
    FitKoopmanDict: Adam, lr 1e-4, batch 64 trajectories), then freeze the dictionary (``requires_grad=False``).

    Each step samples ``batch_size`` trajectories without replacement from a generator seeded with ``seed``.
    Trajectories with fewer than m+1 transitions (rank-deficient K) are skipped. The paper gives no step count
    (the authors' code runs one epoch, N / 64 steps); 50 steps take about 9 s on one CPU core for 64 x 256
    tokens, d=576, m=50, a third of it in ``eig`` of the 64 operators.

    Args:
        dictionary: the dictionary to fit in place.
        trajectories: detached (T_i, d) hidden states of the first step's responses, on one device.

    Raises:
        ValueError: if a trajectory is not (T, d) or no trajectory has m+1 transitions.
    """
    start = time.perf_counter()
    if steps < 0 or batch_size < 1:
        raise ValueError(f"fit_dictionary needs steps >= 0 and batch_size >= 1, got {steps=}, {batch_size=}")
    d, m = dictionary.proj.in_features, dictionary.proj.out_features
    for i, t in enumerate(trajectories):
        if t.dim() != 2 or t.shape[1] != d:
            raise ValueError(f"trajectory {i} has shape {tuple(t.shape)}, expected (T, d={d})")
    usable = [t.detach() for t in trajectories if t.shape[0] - 1 >= m + 1]
    if not usable:
        lengths = [t.shape[0] for t in trajectories] or [0]
        raise ValueError(
            f"no trajectory has the m+1={m + 1} transitions (m={m}) a full-rank K needs: "
            f"lengths range from {min(lengths)} to {max(lengths)} tokens"
        )
    hidden, mask = _pad(usable)
    pairs = mask[:, :-1] & mask[:, 1:]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(dictionary.parameters(), lr=lr)
    initial_loss = _evaluate(dictionary, hidden, mask, eps, batch_size)[0]
    losses = []
    dictionary.requires_grad_(True)
    with torch.enable_grad():
        for _ in range(steps):
            if hidden.shape[0] > batch_size:
                batch = torch.randperm(hidden.shape[0], generator=generator)[:batch_size].to(hidden.device)
                x, p = hidden[batch], pairs[batch]
            else:  # every trajectory fits in one batch: no sampling, no copy
                x, p = hidden, pairs
            loss = resdmd_residual(*_snapshots(dictionary(x), p), eps).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    dictionary.requires_grad_(False)
    final_loss, cond_x, saturated_fraction = _evaluate(dictionary, hidden, mask, eps, batch_size)
    return FitReport(losses, initial_loss, final_loss, cond_x, saturated_fraction, time.perf_counter() - start)
