"""The MobileLLM-R1 influence method at small scale.

1. Train a proxy on the uniform mixture of the participating sources, keeping evenly spaced checkpoints.
2. At each checkpoint t, take the gradient of each capability's probe loss (held-out documents named per
   capability) and of each scored training sample's loss.
3. A sample's influence is its first-order effect on probe loss: the dot product of its gradient with each
   capability's probe gradient. Probe gradients are scaled to unit length so every capability counts the same
   whatever its loss scale, capabilities are averaged, and checkpoints are combined with weights
   proportional to t (later, better-trained checkpoints say more).
4. rho_g = (1/N_g) * sum over scored samples of I(x) * len(x), N_g the tokens of those samples; negatives are
   clipped to zero and w_g = rho_g / sum(rho).
"""

from __future__ import annotations

import numpy as np

from tinylm.data.config import DataConfig
from tinylm.data.proxy import Proxy, probe_rows, probe_sets, sample_docs
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError


def checkpoint_steps(total: int, count: int) -> list[int]:
    """Evenly spaced steps, the last at `total`: 60 steps and 3 checkpoints give 20, 40, 60."""
    if count < 1 or total < count:
        raise UserError(f"influence needs steps >= checkpoints >= 1, got {total} steps and {count} checkpoints")
    return [round(total * (i + 1) / count) for i in range(count)]


def influence_scores(data_cfg: DataConfig, shards: ShardSet, names: list[str], progress: bool = False) -> dict:
    """Per-sample influence scores of every participating source, with the pieces they were made from."""
    cfg = data_cfg.mixture.influence
    caps = probe_sets(data_cfg.mixture.probes, names, shards)
    rng = np.random.default_rng(cfg.seed)
    samples = {g: sample_docs(shards, g, cfg.samples_per_source, cfg.seq_len, rng) for g in names}
    probes = {c: probe_rows(shards, srcs, cfg.seq_len, cfg.probe_samples, f"influence probe {c!r}")
              for c, srcs in caps.items()}
    proxy = Proxy(shards, dim=cfg.dim, layers=cfg.layers, heads=cfg.heads, seq_len=cfg.seq_len, lr=cfg.lr,
                  seed=cfg.seed)
    uniform = {g: 1.0 for g in names}
    steps = checkpoint_steps(cfg.steps, cfg.checkpoints)
    alphas = np.arange(1, len(steps) + 1, dtype=np.float64)
    alphas /= alphas.sum()
    scores = {g: np.zeros(len(samples[g])) for g in names}
    per_capability = {c: {g: 0.0 for g in names} for c in caps}
    probe_losses = []
    for t, target in enumerate(steps):
        proxy.train(uniform, target - proxy.steps_done, cfg.batch_size)
        probe_losses.append({c: proxy.loss(rows) for c, rows in probes.items()})
        directions = {}
        for c, rows in probes.items():
            g = proxy.gradient(rows)
            directions[c] = g / max(float(g.norm()), 1e-12)
        for g_name, docs in samples.items():
            for i, doc in enumerate(docs):
                grad = proxy.gradient(doc[None, :])
                for c, d in directions.items():
                    value = float(grad @ d)
                    # The learning rate turns the gradient product into a loss change (TracIn's eta_t).
                    contribution = alphas[t] * cfg.lr * value / len(caps)
                    scores[g_name][i] += contribution
                    per_capability[c][g_name] += contribution * (len(doc) - 1)
    lengths = {g: np.array([len(d) - 1 for d in samples[g]], dtype=np.float64) for g in names}
    return {"scores": scores, "lengths": lengths, "per_capability": per_capability, "checkpoints": steps,
            "checkpoint_weights": alphas.tolist(), "probe_losses": probe_losses, "capabilities": caps}


def influence_weights(data_cfg: DataConfig, shards: ShardSet, names: list[str], progress: bool = False):
    """(weights, report): w_g proportional to the clipped token-weighted mean influence of source g."""
    found = influence_scores(data_cfg, shards, names, progress)
    rho = {}
    for g in names:
        lengths = found["lengths"][g]
        rho[g] = float((found["scores"][g] * lengths).sum() / lengths.sum())
    clipped = {g: max(0.0, r) for g, r in rho.items()}
    report = {
        "rho": rho,
        "mean_score": {g: float(found["scores"][g].mean()) for g in names},
        "positive_share": {g: float((found["scores"][g] > 0).mean()) for g in names},
        "samples": {g: int(found["scores"][g].size) for g in names},
        "per_capability": {c: {g: v / found["lengths"][g].sum() for g, v in per.items()}
                           for c, per in found["per_capability"].items()},
        "checkpoints": found["checkpoints"],
        "checkpoint_weights": found["checkpoint_weights"],
        "probe_losses": found["probe_losses"],
        "capabilities": found["capabilities"],
    }
    if not sum(clipped.values()) > 0:
        raise UserError("influence: no source has a positive influence on the probe sets (all scores <= 0); "
                        "train the proxy longer (data.mixture.influence.steps) or choose other probes")
    return clipped, report
