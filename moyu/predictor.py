"""Low-rank predictors of MLP neuron scores from the MLP input (the Deja Vu idea).

A predictor sees only the current hidden state ``x`` (the MLP input) and outputs one
score per neuron; the neurons it ranks highest are its guess of the active set. It is
``scores(x) = ((x - mu) / sigma) @ U @ V + b`` with ``U: [d, r]``, ``V: [r, d_ff]``.

:func:`fit_lowrank` starts from reduced-rank ridge regression (closed form: the ridge
solution projected onto the top-r singular directions of its fitted values), then
refines with a few full-batch Adam steps on the mean squared error. On CPU this takes
well under a second per layer at SmolLM2 sizes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LowRankPredictor:
    """``scores(x) = ((x - mu) / sigma) @ U @ V + b``; fitted by :func:`fit_lowrank`."""

    mu: torch.Tensor      # [d]
    sigma: torch.Tensor   # [d]
    U: torch.Tensor       # [d, r]
    V: torch.Tensor       # [r, d_ff]
    b: torch.Tensor       # [d_ff]

    @property
    def rank(self) -> int:
        """Rank r of the factorisation."""
        return self.U.shape[1]

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Predicted neuron scores for inputs ``x`` of shape ``[..., d]`` -> ``[..., d_ff]``."""
        z = (x.float() - self.mu) / self.sigma
        return (z @ self.U) @ self.V + self.b

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that :meth:`from_state_dict` restores (``torch.save``-able)."""
        return {"mu": self.mu, "sigma": self.sigma, "U": self.U, "V": self.V, "b": self.b}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor]) -> "LowRankPredictor":
        """Rebuild a predictor saved with :meth:`state_dict`."""
        return cls(**{k: sd[k].clone() for k in ("mu", "sigma", "U", "V", "b")})

    def folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same map on raw inputs: ``(A [d, r], B [r, d_ff], bias)`` with ``scores = (x @ A) @ B + bias``."""
        a = self.U / self.sigma[:, None]
        return a, self.V.clone(), self.b - (self.mu @ a) @ self.V

    def nbytes(self) -> int:
        """Memory of the parameters."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression with intercept: ``(W [d, k], b [k])`` minimising ``|xW + b - y|^2 + lam' |W|^2``.

    ``lam`` is relative: ``lam' = lam * mean(diag(x_c^T x_c))``, so it does not depend on
    the scale of ``x``. Solved in float64.
    """
    xm, ym = x.mean(0), y.mean(0)
    xc, yc = (x - xm).double(), (y - ym).double()
    gram = xc.t() @ xc
    gram += lam * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xc.t() @ yc).float()
    return w, ym - xm @ w


def fit_lowrank(X: torch.Tensor, Y: torch.Tensor, rank: int, steps: int = 0, seed: int = 0,
                ridge_lam: float = 1e-2, lr: float = 1e-2) -> LowRankPredictor:
    """Fit a rank-``rank`` linear map from ``X: [n, d]`` to target scores ``Y: [n, d_ff]``.

    The closed form (reduced-rank ridge regression) is already the squared-error optimum
    for the rank; ``steps`` Adam steps on the squared error refine it further where the
    ridge term or the randomised SVD left slack (0 = closed form only). ``seed`` fixes the
    randomised SVD.
    """
    if X.dim() != 2 or Y.dim() != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"fit_lowrank needs X [n, d] and Y [n, d_ff], got {tuple(X.shape)} "
                         f"and {tuple(Y.shape)}")
    X, Y = X.float(), Y.float()
    n, d = X.shape
    rank = max(1, min(rank, d, Y.shape[1]))
    mu = X.mean(0)
    sigma = X.std(0, unbiased=False).clamp_min(1e-6)
    Z = (X - mu) / sigma
    W, b = ridge(Z, Y, ridge_lam)                   # [d, d_ff], [d_ff]
    Yc = Y - b
    # Reduced-rank regression: project onto the top right-singular vectors of the fit Z W.
    # Randomised SVD: only the top-r directions are needed, and a full SVD of [n, d_ff] is slow.
    torch.manual_seed(seed)
    _, _, Vr = torch.svd_lowrank(Z @ W, q=min(rank + 10, min(n, Y.shape[1])), niter=3)
    P = Vr[:, :rank].T                              # [r, d_ff]
    U, V = (W @ P.T).float(), P.float().clone()
    if steps > 0:
        U.requires_grad_(True)
        V.requires_grad_(True)
        opt = torch.optim.Adam([U, V], lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = ((Z @ U) @ V - Yc).pow(2).mean()
                loss.backward()
                opt.step()
        U, V = U.detach(), V.detach()
    return LowRankPredictor(mu=mu.float(), sigma=sigma.float(), U=U, V=V, b=b.float())


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries along the last axis."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def topk_recall(pred_scores: torch.Tensor, true_scores: torch.Tensor, k: int) -> float:
    """Mean share of the true top-``k`` neurons (by ``true_scores``) that the predicted top-``k`` finds.

    Both inputs are ``[..., d_ff]``; the mean runs over all leading positions. 1.0 is the
    ceiling; a random guess scores ``k / d_ff`` on average.
    """
    if not 0 < k <= true_scores.shape[-1]:
        raise ValueError(f"k must be in 1..{true_scores.shape[-1]}, got {k}")
    hit = topk_mask(pred_scores, k) & topk_mask(true_scores, k)
    return float(hit.sum(-1).float().mean() / k)
