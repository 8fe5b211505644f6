"""Per-phase mixture weights: the method named in the recipe, then the repetition cap, then the sampler's phases.

Weights are computed once per (prepared data, mixture settings, token budget) and saved as `mixture.json` in
the data directory, so a trainer that resumes, or a `mix` followed by `train`, does not re-run proxy models.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from tinylm.data.config import MIXTURE_METHODS, DataConfig, MixtureConfig, PhaseConfig
from tinylm.data.sampler import Phase, normalized
from tinylm.data.shards import ShardSet
from tinylm.files import atomic_write_json
from tinylm.errors import UserError

MIXTURE_FILE = "mixture.json"


def train_tokens(shards: ShardSet) -> dict[str, int]:
    """Training tokens per source (from the shard offsets, so any manifest with the shard layout works)."""
    return {name: shards.split(name, "train").num_tokens for name in shards.sources}


def phase_spans(mix: MixtureConfig, total_tokens: int) -> list[tuple[PhaseConfig, int, int]]:
    """(phase, first token, end token) for each phase, in order."""
    if not mix.phases:
        raise UserError("data.mixture.phases is empty; give at least one phase")
    if total_tokens <= 0:
        raise UserError(f"the mixture needs a positive number of training tokens, got {total_tokens}")
    starts = [p.start_fraction for p in mix.phases]
    if starts[0] != 0:
        raise UserError(f"mixture phase {mix.phases[0].name!r} is first and must have start_fraction 0")
    if any(not 0 <= s < 1 for s in starts) or any(b <= a for a, b in zip(starts, starts[1:])):
        raise UserError(f"mixture phase start_fraction values must rise from 0 and stay below 1, got {starts}")
    bounds = [int(round(s * total_tokens)) for s in starts] + [total_tokens]
    return [(p, bounds[i], bounds[i + 1]) for i, p in enumerate(mix.phases)]


def phase_method(mix: MixtureConfig, phase: PhaseConfig) -> str:
    method = phase.method or mix.method
    if method not in MIXTURE_METHODS:
        raise UserError(f"mixture phase {phase.name!r}: unknown method {method!r} (known: {', '.join(MIXTURE_METHODS)})")
    return method


def participants(phase: PhaseConfig, sizes: dict[str, int]) -> list[str]:
    """The sources a phase draws from: those its `weights` list, or every source."""
    unknown = [s for s in phase.weights if s not in sizes]
    if unknown:
        raise UserError(f"mixture phase {phase.name!r}: source {unknown[0]!r} is not in the prepared data "
                        f"(sources: {', '.join(sizes)})")
    return list(phase.weights) if phase.weights else list(sizes)


def temperature_weights(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """p proportional to tokens**alpha: alpha 1 follows size, 0 is uniform, between them flattens."""
    if alpha < 0:
        raise UserError(f"data.mixture.alpha must be >= 0, got {alpha}")
    return {k: float(n) ** alpha if n > 0 else 0.0 for k, n in sizes.items()}


def cap_weights(weights: dict[str, float], room: dict[str, float], phase_tokens: int, phase: str,
                spill: bool = False) -> dict[str, float]:
    """Move weight off sources that would exceed their remaining token room onto the others, in proportion.

    `room[g]` is how many more tokens source g may contribute (max_epochs times its size, minus what earlier
    phases took). When the sources with weight are all at their cap, `spill` lets the rest go to the sources
    given no weight, in proportion to their room (a computed zero says "least useful", not "forbidden"; a
    manual zero is the user's and is kept). A `UserError` if the phase still cannot be filled.
    """
    w = normalized(weights, f"mixture phase {phase!r}")
    cap = {g: room[g] / phase_tokens for g in w}
    allowed = [g for g, v in w.items() if v > 0]
    fixed: dict[str, float] = {}
    while True:
        free = {g: v for g, v in w.items() if g not in fixed and v > 0}
        mass = 1.0 - sum(fixed.values())
        if not free and mass > 1e-9 and spill:
            spill = False
            w = {g: (room[g] if v == 0 else 0.0) for g, v in w.items()}
            allowed = list(w)
            continue
        if not free:
            if mass > 1e-9:
                have = sum(max(0.0, room[g]) for g in allowed)
                raise UserError(f"mixture phase {phase!r} needs {phase_tokens:,} tokens but its sources can give "
                                f"only {int(have):,} within the repetition cap (data.mixture.max_epochs); add data, "
                                f"raise max_epochs or train on fewer tokens")
            break
        free_total = sum(free.values())
        scaled = {g: v * mass / free_total for g, v in free.items()}
        over = [g for g, v in scaled.items() if v > cap[g] + 1e-12]
        if not over:
            fixed.update(scaled)
            break
        for g in over:
            fixed[g] = cap[g]
    return {g: fixed.get(g, 0.0) for g in w}


def _method_weights(method: str, data_cfg: DataConfig, shards: ShardSet, sizes: dict[str, int], phase: PhaseConfig,
                    progress: bool) -> tuple[dict[str, float], dict]:
    mix = data_cfg.mixture
    if method == "manual":
        if not phase.weights:
            raise UserError(f"mixture phase {phase.name!r}: method 'manual' needs weights = {{source = weight, ...}}")
        return dict(phase.weights), {}
    if method == "temperature":
        return temperature_weights(sizes, mix.alpha), {}
    if method == "influence":
        from tinylm.data.influence import influence_weights

        return influence_weights(data_cfg, shards, list(sizes), progress=progress)
    from tinylm.data.regmix import regmix_weights

    return regmix_weights(data_cfg, shards, list(sizes), progress=progress)


def mixture_key(data_cfg: DataConfig, shards: ShardSet, total_tokens: int) -> str:
    blob = json.dumps([shards.fingerprint, asdict(data_cfg.mixture), total_tokens], sort_keys=True)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def compute_mixture(data_cfg: DataConfig, shards: ShardSet, total_tokens: int, *, progress: bool = False) -> dict:
    """The weights of every phase with the tokens and epochs each source contributes, and method diagnostics."""
    mix = data_cfg.mixture
    if mix.max_epochs <= 0:
        raise UserError(f"data.mixture.max_epochs must be positive, got {mix.max_epochs}")
    all_sizes = train_tokens(shards)
    room = {g: mix.max_epochs * n for g, n in all_sizes.items()}
    used = dict.fromkeys(all_sizes, 0.0)
    phases = []
    for phase, start, end in phase_spans(mix, total_tokens):
        method = phase_method(mix, phase)
        sizes = {g: all_sizes[g] for g in participants(phase, all_sizes)}
        raw, details = _method_weights(method, data_cfg, shards, sizes, phase, progress)
        raw = {g: float(raw.get(g, 0.0)) for g in sizes}
        phase_tokens = end - start
        if phase_tokens <= 0:
            raise UserError(f"mixture phase {phase.name!r} has no tokens (total {total_tokens})")
        capped = cap_weights(raw, {g: room[g] - used[g] for g in sizes}, phase_tokens, phase.name,
                             spill=method != "manual")
        method_weights = normalized(raw, f"mixture phase {phase.name!r}")
        # Every source appears in every phase's report, with 0 where the phase does not draw from it.
        weights = {g: capped.get(g, 0.0) for g in all_sizes}
        method_weights = {g: method_weights.get(g, 0.0) for g in all_sizes}
        tokens = {g: w * phase_tokens for g, w in weights.items()}
        for g, t in tokens.items():
            used[g] += t
        phases.append({
            "name": phase.name,
            "method": method,
            "start_tokens": start,
            "tokens": phase_tokens,
            "weights": weights,
            "method_weights": method_weights,
            "tokens_per_source": {g: int(round(t)) for g, t in tokens.items()},
            "epochs": {g: (t / all_sizes[g] if all_sizes[g] else 0.0) for g, t in tokens.items()},
            "details": details,
        })
    return {
        "total_tokens": total_tokens,
        "max_epochs": mix.max_epochs,
        "source_tokens": all_sizes,
        "epochs": {g: used[g] / n if n else 0.0 for g, n in all_sizes.items()},
        "phases": phases,
        "data_fingerprint": shards.fingerprint,
    }


def load_or_compute(data_cfg: DataConfig, shards: ShardSet, total_tokens: int, *, progress: bool = False,
                    recompute: bool = False) -> dict:
    """`compute_mixture`, reusing `mixture.json` in the data directory when it was made from the same inputs."""
    key = mixture_key(data_cfg, shards, total_tokens)
    path = Path(shards.root) / MIXTURE_FILE
    if not recompute and path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved
        except json.JSONDecodeError:
            pass
    result = compute_mixture(data_cfg, shards, total_tokens, progress=progress)
    result["key"] = key
    atomic_write_json(path, result)
    return result


def to_phases(result: dict) -> list[Phase]:
    return [Phase(p["name"], int(p["start_tokens"]), {g: w for g, w in p["weights"].items() if w > 0})
            for p in result["phases"]]


def resolve_phases(data_cfg: DataConfig, shards: ShardSet, total_tokens: int, *, progress: bool = False,
                   recompute: bool = False) -> list[Phase]:
    """The sampler's phases for a run of `total_tokens` training tokens (computed or read from mixture.json)."""
    return to_phases(load_or_compute(data_cfg, shards, total_tokens, progress=progress, recompute=recompute))
