"""Small proxy models for mixture search: training on a mixture, probe rows, losses and gradients.

Proxies run on the PyTorch backend in float32 on the CPU: they are tiny, and the same numbers come out on
every machine, which keeps mixture weights reproducible.
"""

from __future__ import annotations

import numpy as np

from tinylm.data.sampler import MixtureSampler, Phase
from tinylm.data.shards import ShardSet
from tinylm.errors import UserError


def probe_sets(probes: dict[str, list[str]], names: list[str], shards: ShardSet) -> dict[str, list[str]]:
    """Capability -> the sources whose validation documents probe it; one capability per source if none given."""
    sets = {k: list(v) for k, v in probes.items()} if probes else {n: [n] for n in shards.sources}
    for cap, sources in sets.items():
        if not sources:
            raise UserError(f"data.mixture.probes.{cap} lists no sources")
        for s in sources:
            if s not in shards.sources:
                raise UserError(f"data.mixture.probes.{cap}: source {s!r} is not in the prepared data")
    return sets


def probe_rows(shards: ShardSet, sources: list[str], seq_len: int, max_rows: int, what: str) -> np.ndarray:
    """Held-out rows for a probe set: the sources' validation documents packed back to back."""
    pieces = [np.asarray(shards.split(s, "val").tokens, dtype=np.int64) for s in sources]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int64)
    n = min(max_rows, tokens.size // (seq_len + 1))
    if n == 0:
        raise UserError(f"{what}: the validation split of {', '.join(sources)} has fewer than {seq_len + 1} tokens; "
                        f"raise data.val_fraction or lower the proxy seq_len")
    return tokens[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def sample_docs(shards: ShardSet, source: str, count: int, seq_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to `count` distinct training documents of a source, each cut to `seq_len + 1` tokens (at least 2)."""
    split = shards.split(source, "train")
    lengths = np.diff(np.asarray(split.offsets))
    usable = np.flatnonzero(lengths >= 2)
    if usable.size == 0:
        raise UserError(f"data source {source!r} has no training document of two or more tokens to score")
    chosen = rng.choice(usable, size=min(count, usable.size), replace=False)
    return [np.asarray(split.doc(int(i))[: seq_len + 1], dtype=np.int64) for i in sorted(chosen)]


class Proxy:
    """A tiny model with its optimizer state, trained on one mixture."""

    def __init__(self, shards: ShardSet, *, dim: int, layers: int, heads: int, seq_len: int, lr: float, seed: int):
        try:
            from tinylm.backends import get_backend
        except ImportError as e:  # the model core is optional for the data half
            raise UserError(f"mixture proxies need the model core and a backend: {e}") from None
        from tinylm.model import ModelShape, init_params
        from tinylm.train.optim import OptimConfig
        from tinylm.train.step import TrainModule

        if dim % heads or (dim // heads) % 2:
            raise UserError(f"proxy model: dim {dim} must split into {heads} heads of even size")
        self.backend = get_backend("torch", dtype="float32")
        self.shape = ModelShape(n_layers=layers, dim=dim, n_heads=heads, n_kv_heads=heads, ffn_dim=4 * dim,
                                vocab_size=shards.vocab_size, max_seq_len=seq_len + 1)
        self.module = TrainModule(self.backend, self.shape, OptimConfig(lr=lr, weight_decay=0.0), "float32")
        self.backend.seed(seed)
        self.params = self.backend.from_numpy(init_params(self.shape, seed))
        self.state = self.module.init_state(self.params)
        self.shards = shards
        self.seq_len = seq_len
        self.lr = lr
        self.seed = seed
        self.steps_done = 0

    def train(self, weights: dict[str, float], steps: int, batch_size: int) -> float:
        """`steps` AdamW steps on rows drawn from `weights` (warmup over the first tenth); the last loss."""
        sampler = MixtureSampler(self.shards, [Phase("proxy", 0, weights)], self.seq_len, batch_size, self.seed)
        warmup = max(1, steps // 10)
        loss = float("nan")
        for _ in range(steps):
            step = self.steps_done
            lr = self.lr * min(1.0, (step + 1) / warmup)
            self.params, self.state, loss, _ = self.module.step(self.params, self.state, [sampler.batch(step)], lr,
                                                                step + 1)
            self.steps_done += 1
        return loss

    def loss(self, rows: np.ndarray) -> float:
        return float(self.module.token_losses(self.params, rows).mean())

    def gradient(self, rows: np.ndarray):
        """The mean-loss gradient over `rows`, flattened into one float32 torch vector."""
        import torch

        _, grads = self.module.loss_and_grads(self.params, [rows])
        return torch.cat([grads[k].reshape(-1) for k in sorted(grads)])
