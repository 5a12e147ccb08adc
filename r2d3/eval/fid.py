"""Multi-view FID: the Fréchet distance between two sets of renders in an image feature space.

Definition (prior preservation: how far a model's renders moved, as a distribution, from the base
model's): each asset's ``V`` views go through a feature extractor (:mod:`r2d3.eval.extractors`) and
are **pooled per asset** (mean over views), giving one vector per asset; each set of ``N`` vectors is
summarised by its mean ``mu`` and covariance ``Sigma`` (unbiased, ``N − 1``), and

    FID = |mu_a − mu_b|² + tr(Sigma_a) + tr(Sigma_b) − 2 tr((Sigma_a^½ Sigma_b Sigma_a^½)^½)

computed in float64. The trace term uses the symmetric form ``Sigma_a^½ Sigma_b Sigma_a^½`` (positive
semi-definite, so an eigendecomposition gives its square root's trace exactly; negative round-off
eigenvalues are clamped to 0), which equals ``tr((Sigma_a Sigma_b)^½)``. Rank-deficient covariances
(fewer assets than feature dimensions, common in small evaluations) are handled without the ``eps``
regularisation other implementations add.

FID depends on the sample size (its estimate is biased upwards for small ``N``) and on the feature
space, so only compare numbers computed with the same extractor and the same number of assets.
"""

from __future__ import annotations

import torch
from torch import Tensor

from r2d3.eval.bootstrap import bootstrap_replicates, percentile_interval
from r2d3.eval.extractors import pool_views, view_features


def feature_stats(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64) of ``[N, D]`` features (``N >= 2``)."""
    x = features.detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FID needs features [N, D] with N >= 2, got shape {tuple(x.shape)}")
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def _psd_sqrt(cov: Tensor) -> Tensor:
    evals, evecs = torch.linalg.eigh(cov)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def _distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, root_b: Tensor, trace_b: Tensor) -> float:
    """The Fréchet distance with B's covariance given by its square root and trace
    (tr sqrt(C_a C_b) = tr sqrt(C_b^1/2 C_a C_b^1/2))."""
    cov_a = (cov_a + cov_a.T) / 2
    middle = root_b @ cov_a @ root_b
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + trace_b - 2 * tr_sqrt
    return max(float(value), 0.0)  # round-off can leave -1e-16 for identical sets


def frechet_distance(mu_a: Tensor, cov_a: Tensor, mu_b: Tensor, cov_b: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between Gaussians ``N(mu_a, cov_a)`` and ``N(mu_b, cov_b)``."""
    mu_a, mu_b, cov_a, cov_b = (t.to(torch.float64) for t in (mu_a, mu_b, cov_a, cov_b))
    if mu_a.shape != mu_b.shape or cov_a.shape != cov_b.shape or cov_a.shape != (mu_a.numel(),) * 2:
        raise ValueError(f"mismatched shapes: means {tuple(mu_a.shape)}, {tuple(mu_b.shape)}; covariances "
                         f"{tuple(cov_a.shape)}, {tuple(cov_b.shape)}")
    cov_b = (cov_b + cov_b.T) / 2
    return _distance(mu_a, cov_a, mu_b, _psd_sqrt(cov_b), torch.trace(cov_b))


class FrechetReference:
    """A fixed reference set's Gaussian, so the distances of many sets to it share one matrix root
    (tr sqrt(C_a C_b) is computed as tr sqrt(C_b^1/2 C_a C_b^1/2), the same value)."""

    def __init__(self, features: Tensor):
        self.mu, cov = feature_stats(features)
        cov = (cov + cov.T) / 2
        self.root, self.trace = _psd_sqrt(cov), torch.trace(cov)

    def distance(self, features: Tensor) -> float:
        return _distance(*feature_stats(features), self.mu, self.root, self.trace)


def fid(features_a: Tensor, features_b: Tensor) -> float:
    """FID between two sets of per-asset features ``[N_a, D]`` and ``[N_b, D]``."""
    if features_a.shape[1:] != features_b.shape[1:]:
        raise ValueError(f"feature dimensions differ: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    if features_a.shape == features_b.shape and torch.equal(features_a, features_b):
        return 0.0  # exactly, rather than the ~1e-11 round-off of rank-deficient square roots
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def multiview_fid(extractor, rgb_a: Tensor, rgb_b: Tensor) -> float:
    """FID between two sets of multi-view renders ``[N, V, 3, H, W]``: features pooled per asset over
    views (see the module docstring)."""
    return fid(pool_views(view_features(extractor, rgb_a)), pool_views(view_features(extractor, rgb_b)))


def fid_bootstrap(features_a: Tensor, features_b: Tensor, groups: int, draws: int = 200, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Bias-corrected bootstrap interval of the FID between two sets of features laid out prompt-major
    (``groups`` prompts x the same number of seeds, ``features.view(groups, seeds, D)``).

    Each replicate resamples prompts with replacement — the same prompts for both sets (paired). A
    resample repeats prompts, which shrinks its effective size, and FID is biased upwards at small
    sizes, so the replicates sit above the point estimate (often entirely). The interval is therefore
    taken from the replicates shifted by the bootstrap estimate of that bias (their mean minus the point
    estimate): ``[F + q_lo − mean, F + q_hi − mean]``, clamped at 0 — the spread of the bootstrap
    around an estimate that the resampling does not move."""
    a = features_a.detach().to(torch.float64).reshape(groups, -1, features_a.shape[-1])
    b = features_b.detach().to(torch.float64).reshape(groups, -1, features_b.shape[-1])

    def stat(idx: Tensor) -> float:
        return fid(a[idx].reshape(-1, a.shape[-1]), b[idx].reshape(-1, b.shape[-1]))

    point = fid(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]))
    reps = bootstrap_replicates(stat, groups, draws, seed)
    lo, hi = percentile_interval(reps - (reps.mean() - point), level)
    return max(lo, 0.0), max(hi, 0.0)


__all__ = ["feature_stats", "fid", "fid_bootstrap", "frechet_distance", "multiview_fid"]
