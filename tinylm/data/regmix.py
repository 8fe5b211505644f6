"""RegMix at small scale: tiny proxies on Dirichlet mixtures, a regression from weights to probe loss.

Mixtures are drawn from a Dirichlet centred on the sources' token shares (the prior), each proxy trains a few
steps on one mixture and is scored by its mean loss over the capability probe sets. A ridge regression on the
weights predicts that loss for many more candidate mixtures from the same Dirichlet, and the final mixture is
the mean of the best `top_k` predictions (averaging is steadier than trusting the single best point).
"""

from __future__ import annotations

import numpy as np

from tinylm.data.config import DataConfig
from tinylm.data.proxy import Proxy, probe_rows, probe_sets
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError


def dirichlet_mixtures(prior: np.ndarray, concentration: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` mixtures around `prior`; with concentration 1 and a uniform prior, uniform over the simplex."""
    if concentration <= 0:
        raise UserError(f"data.mixture.regmix.concentration must be positive, got {concentration}")
    alpha = np.maximum(prior * len(prior) * concentration, 1e-3)
    return rng.dirichlet(alpha, size=count)


def fit_ridge(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Coefficients (intercept first) of a ridge regression; the intercept is not penalized."""
    design = np.hstack([np.ones((x.shape[0], 1)), x])
    penalty = l2 * np.eye(design.shape[1])
    penalty[0, 0] = 0.0
    return np.linalg.solve(design.T @ design + penalty, design.T @ y)


def predict(coef: np.ndarray, x: np.ndarray) -> np.ndarray:
    return coef[0] + x @ coef[1:]


def regmix_weights(data_cfg: DataConfig, shards: ShardSet, names: list[str], progress: bool = False):
    """(weights, report) from the RegMix search over the participating sources."""
    cfg = data_cfg.mixture.regmix
    if cfg.proxies < 2 or cfg.top_k < 1 or cfg.candidates < cfg.top_k:
        raise UserError("data.mixture.regmix needs proxies >= 2 and candidates >= top_k >= 1")
    caps = probe_sets(data_cfg.mixture.probes, names, shards)
    probes = {c: probe_rows(shards, srcs, cfg.seq_len, 16, f"regmix probe {c!r}") for c, srcs in caps.items()}
    sizes = np.array([shards.split(g, "train").num_tokens for g in names], dtype=np.float64)
    prior = sizes / sizes.sum()
    rng = np.random.default_rng(cfg.seed)
    mixtures = dirichlet_mixtures(prior, cfg.concentration, cfg.proxies, rng)
    losses = np.zeros(cfg.proxies)
    for i, w in enumerate(mixtures):
        proxy = Proxy(shards, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, seq_len=cfg.seq_len, lr=cfg.lr,
                      seed=cfg.seed + i)
        # A source with weight exactly 0 would be rejected by the sampler only if it had no documents; tiny
        # weights are fine, so keep every drawn mixture as it is.
        proxy.train({g: float(v) for g, v in zip(names, w)}, cfg.steps, cfg.batch_size)
        losses[i] = float(np.mean([proxy.loss(rows) for rows in probes.values()]))
    coef = fit_ridge(mixtures, losses)
    fitted = predict(coef, mixtures)
    candidates = dirichlet_mixtures(prior, cfg.concentration, cfg.candidates, rng)
    predicted = predict(coef, candidates)
    best = np.argsort(predicted)[: cfg.top_k]
    final = candidates[best].mean(axis=0)
    residual = losses - fitted
    total_var = float(((losses - losses.mean()) ** 2).sum())
    report = {
        "proxy_mixtures": [{g: float(v) for g, v in zip(names, w)} for w in mixtures],
        "proxy_probe_loss": losses.tolist(),
        "coefficients": {"intercept": float(coef[0]), **{g: float(c) for g, c in zip(names, coef[1:])}},
        "r2": 1.0 - float((residual**2).sum()) / total_var if total_var > 0 else 0.0,
        "predicted_loss": float(predict(coef, final[None, :])[0]),
        "prior": {g: float(p) for g, p in zip(names, prior)},
        "capabilities": caps,
    }
    return {g: float(v) for g, v in zip(names, final)}, report
