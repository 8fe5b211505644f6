"""Mid-training with data-model co-evolution (MobileLLM-R1): the model being trained scores its own data.

An `lm` stage with `[coevolve] rounds = N` splits its steps into N rounds. At the start of each round the
current weights score every candidate sample (a fixed draw of `candidates_per_source` training documents per
source) by its influence on the capability probe sets, with the influence machinery of
`tinylm.data.influence`: the dot product of the sample's loss gradient with each capability's unit-length probe
gradient, averaged over capabilities. Samples with positive influence are kept; the source ratios become each
source's clipped token-weighted mean influence over its candidates (rho_g of the influence mixture), normalised;
the round then trains on rows packed from the kept samples (as scored: cut to `seq_len` tokens), sources
drawn by those ratios.

Every round re-scores the whole candidate set with the weights of that moment, so a round's rows are a pure
function of (seed, step, the weights at the round's start): checkpoints fall on round boundaries (`ckpt_every`
a multiple of the round length) and a resumed run scores, keeps and trains on the same samples. Each round's
counts go to `coevolution.json` in the stage's folder and into the log row of the round's first step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinylm.errors import UserError


@dataclass
class CoevolveConfig:
    """The `[coevolve]` section of an `lm` (mid-training) stage."""

    rounds: int = 0
    """Rounds of re-scoring then training; 0 turns co-evolution off (the stage trains on its mixture)."""
    candidates_per_source: int = 32
    """Training documents per source scored each round (the same draw every round)."""
    probe_rows: int = 8
    """Held-out rows per capability probe set (from `data.mixture.probes`, else one capability per source)."""
    seq_len: int = 64
    """Candidates and probe rows are cut to this many tokens for scoring."""

    def __post_init__(self):
        for name in ("rounds",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("candidates_per_source", "probe_rows", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


class CoevolveData:
    """Wraps a stage's `PretrainData`: same shards, validation and fingerprint; rows from each round's kept
    samples. `attach(trainer)` gives it the weights to score with."""

    def __init__(self, cfg: CoevolveConfig, data, recipe, out):
        from tinylm.data.proxy import probe_rows, probe_sets, sample_docs

        self.data, self.cfg = data, cfg
        train = recipe.train
        if train.steps % cfg.rounds or train.ckpt_every % (train.steps // cfg.rounds):
            raise UserError(f"coevolve.rounds ({cfg.rounds}) must divide train.steps ({train.steps}) and the round "
                            f"length must divide train.ckpt_every ({train.ckpt_every}): checkpoints fall on round "
                            f"boundaries so that a resumed run keeps the same samples")
        self.round_steps = train.steps // cfg.rounds
        self.seed, self.seq_len = train.seed, train.seq_len
        self.rows_per_step = data.sampler.rows_per_step
        shards = data.shards
        names = list(shards.sources)
        rng = np.random.default_rng([train.seed, 11])
        self.candidates = {g: sample_docs(shards, g, cfg.candidates_per_source, cfg.seq_len, rng) for g in names}
        caps = probe_sets(recipe.data.mixture.probes, names, shards)
        self.probes = {c: probe_rows(shards, s, cfg.seq_len, cfg.probe_rows, f"coevolve probe {c!r}")
                       for c, s in caps.items()}
        self.report_path = out / "coevolution.json"
        self.trainer = None
        self._round = (None, None)
        self._metrics: dict[int, dict] = {}

    def __getattr__(self, name):
        return getattr(self.data, name)

    def attach(self, trainer) -> None:
        self.trainer = trainer

    def _gradient(self, rows: np.ndarray) -> np.ndarray:
        _, grads = self.trainer.module.loss_and_grads(self.trainer.params, [rows])
        grads = self.trainer.backend.to_numpy(grads)
        return np.concatenate([grads[k].reshape(-1).astype(np.float64) for k in sorted(grads)])

    def score(self) -> dict:
        """One round's scoring with the current weights: influence per candidate, kept samples, source ratios."""
        directions = []
        for rows in self.probes.values():
            g = self._gradient(rows)
            directions.append(g / max(float(np.linalg.norm(g)), 1e-12))
        scores, kept, rho = {}, {}, {}
        for name, docs in self.candidates.items():
            s = np.array([float(np.mean([self._gradient(d[None, :]) @ u for u in directions])) for d in docs])
            lengths = np.array([len(d) - 1 for d in docs], np.float64)
            scores[name] = s
            kept[name] = [i for i in range(len(docs)) if s[i] > 0]
            rho[name] = max(0.0, float((s * lengths).sum() / lengths.sum()))
        total = sum(rho.values())
        if not total > 0 or not any(kept.values()):
            raise UserError("coevolve: no candidate has a positive influence on the probe sets with the current "
                            "weights; choose other probes or more candidates")
        return {"kept": kept, "weights": {g: r / total for g, r in rho.items()}, "scores": scores}

    def _write_report(self, k: int, found: dict) -> None:
        import json

        from tinylm.files import atomic_write_json

        rounds = json.loads(self.report_path.read_text())["rounds"] if self.report_path.exists() else []
        rounds = [r for r in rounds if r["round"] < k + 1]
        rounds.append(self.round_row(k, found))
        if self.trainer.rank == 0:
            atomic_write_json(self.report_path, {"rounds": rounds})

    def round_row(self, k: int, found: dict) -> dict:
        return {"round": k + 1, "step": k * self.round_steps,
                "candidates": {g: len(d) for g, d in self.candidates.items()},
                "kept": {g: len(v) for g, v in found["kept"].items()},
                "weights": {g: round(w, 6) for g, w in found["weights"].items()}}

    def micro_batches(self, step: int, rank: int, world: int, grad_accum: int) -> list[np.ndarray]:
        if self.trainer is None:
            raise RuntimeError("CoevolveData.attach(trainer) must be called before training")
        k = step // self.round_steps
        if self._round[0] != k:
            found = self.score()
            self._round = (k, found)
            self._write_report(k, found)
            row = self.round_row(k, found)
            self._metrics = {step: {f"kept_{g}": n for g, n in row["kept"].items()}}
            self.trainer.reporter.say(f"co-evolution round {k + 1}: kept " + ", ".join(
                f"{g} {n}/{row['candidates'][g]}" for g, n in row["kept"].items()) + "; weights " + ", ".join(
                f"{g} {w:.3f}" for g, w in row["weights"].items()))
        rows = self.rows(step, self._round[1])
        per_rank = self.rows_per_step // world
        return np.split(rows[rank * per_rank:(rank + 1) * per_rank], grad_accum)

    def rows(self, step: int, found: dict) -> np.ndarray:
        """The step's rows: kept samples packed back to back, each drawn by source ratio then uniformly."""
        rng = np.random.default_rng([self.seed, step, 13])
        names = [g for g in found["kept"] if found["kept"][g] and found["weights"][g] > 0]
        if not names:
            names = [g for g in found["kept"] if found["kept"][g]]
        p = np.array([found["weights"][g] for g in names]) + 1e-12
        p /= p.sum()
        width = self.seq_len + 1
        out = np.zeros((self.rows_per_step, width), np.int64)
        for r in range(self.rows_per_step):
            stream: list[int] = []
            while len(stream) < width:
                g = names[int(rng.choice(len(names), p=p))]
                i = found["kept"][g][int(rng.integers(len(found["kept"][g])))]
                stream.extend(self.candidates[g][i].tolist())
            out[r] = stream[:width]
        return out

    def log_metrics(self, step: int) -> dict:
        return self._metrics.get(step, {})
