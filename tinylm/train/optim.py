"""Optimizer rules, written once over flat dicts of backend arrays: AdamW (bias-corrected) and Muon.

Muon (orthogonalized momentum) acts on the 2-D hidden matrices; embeddings, the output head, norms and
gains stay on AdamW. Muon's update is scaled by 0.2 * sqrt(max(rows, cols)) so that its RMS matches AdamW's
(Moonlight, arXiv 2502.16982) and AdamW's learning rate and decoupled weight decay carry over unchanged.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tinylm import config
from tinylm.errors import UserError
from tinylm.model import is_matrix

# Quintic Newton-Schulz coefficients (Keller Jordan's Muon).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@dataclass
class OptimConfig:
    """The `[optim]` section."""

    name: str = "adamw"
    """"adamw", or "muon" (Muon for hidden matrices, AdamW for the rest)."""
    lr: float = 3e-3
    """Peak learning rate (the schedule scales it)."""
    beta1: float = 0.9
    """AdamW first-moment decay."""
    beta2: float = 0.95
    """AdamW second-moment decay."""
    eps: float = 1e-8
    """AdamW denominator epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings; never on norms or gains."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 turns clipping off."""
    muon_momentum: float = 0.95
    """Muon momentum (Nesterov)."""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations that orthogonalize Muon's update."""

    def __post_init__(self):
        config.one_of(self, "name", ("adamw", "muon"))
        config.positive(self, "lr eps")
        config.fraction(self, "beta1 beta2 muon_momentum", below_one=True)
        config.at_least(self, 0, "weight_decay grad_clip")
        config.at_least(self, 1, "muon_ns_steps")


def uses_muon(cfg: OptimConfig, name: str) -> bool:
    return cfg.name == "muon" and is_matrix(name)


def slots(cfg: OptimConfig, name: str) -> tuple[str, ...]:
    """The state slots of parameter `name`, each of its shape: `exp_avg.<name>`, `exp_avg_sq.<name>` (AdamW) or
    `momentum.<name>` (Muon)."""
    return ("momentum." + name,) if uses_muon(cfg, name) else ("exp_avg." + name, "exp_avg_sq." + name)


def init_state(ops, cfg: OptimConfig, params: dict) -> dict:
    """Flat optimizer state: every slot of every parameter, zeros."""
    return {slot: ops.zeros_like(p) for name, p in params.items() for slot in slots(cfg, name)}


def sum_of_squares(ops, grads: dict):
    """The squared norm of `grads` as a whole (0 for none)."""
    # Summed in name order: a float sum depends on its order, and a resumed run (whose dicts come back from
    # a checkpoint in another order) must clip exactly as the uninterrupted one did.
    total, lanes = None, _lanes(ops, grads)
    for name in sorted(grads):
        with lanes[name]:
            sq = ops.sum_squares(grads[name])
        total = sq if total is None else total + sq
    return ops.scalar(0.0) if total is None else total


def global_norm(ops, grads: dict):
    return ops.sqrt(sum_of_squares(ops, grads))


def clip_scale(ops, norm, max_norm: float):
    """The factor that brings a gradient of global norm `norm` down to `max_norm` (1 where it is below);
    None with clipping off (`max_norm` 0)."""
    if max_norm <= 0:
        return None
    return ops.minimum(ops.scalar(1.0), max_norm / (norm + 1e-6))


def _lanes(ops, tensors: dict) -> dict:
    # Each tensor's work in the lane the backend gives it (`ops.lanes`: MLX on a multi-core CPU spreads
    # tensors over streams, since its kernels run on one thread each). The same set of tensors gets the same
    # lanes in every function here, so without sharding (where the norm and the update, which applies the
    # clipping factor, both see every parameter) one tensor's norm, clipping and update run on one stream.
    return ops.lanes({name: t.shape for name, t in tensors.items()})


def newton_schulz(ops, g, steps: int, dtype: str = "float32"):
    """Approximately the nearest semi-orthogonal matrix to g (U V^T of its SVD), iterated in `dtype` and
    returned in float32.

    A bf16 training run iterates in bf16, as Muon's reference implementation does: the iteration converges
    only to singular values between about 0.7 and 1.2 anyway, and its matmuls, about a seventh of a small
    model's step in float32 (`tiny`, 16 x 256 tokens), run several times faster on bf16 matrix units.
    """
    a, b, c = _NS_COEFFS
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    x = ops.cast(x / (ops.sqrt(ops.sum_squares(x)) + 1e-7), dtype)
    for _ in range(steps):
        gram = x @ x.T
        # a x + (b gram + c gram^2) x, as two fused multiply-adds rather than six operations.
        x = ops.addmm(x, ops.addmm(gram, gram, gram, alpha=c, beta=b), x, alpha=1.0, beta=a)
    x = ops.cast(x, "float32")
    return x.T if tall else x


def update(ops, cfg: OptimConfig, params: dict, grads: dict, state: dict, lr, step, dtype: str = "float32",
           grad_scale=None):
    """One optimizer step. `lr` and `step` (1-based) are backend scalars so compiled steps are reused; `dtype`
    is the run's compute dtype, which Muon's orthogonalization runs in; `grad_scale` (a backend scalar, the
    clipping factor of `clip_scale`), if given, multiplies every gradient first."""
    new_params, new_state = {}, {}
    bias1 = 1.0 - cfg.beta1**step
    bias2 = 1.0 - cfg.beta2**step
    # Muon's orthogonalization is matrix products, which use every core already: only the elementwise
    # updates go to lanes (measured on MLX, 2 cores, mobilellm-125m: AdamW's update 0.84 -> 0.56 s; Muon's,
    # spread as well, 6.9 -> 7.9 s).
    lanes = _lanes(ops, params)
    for name, p in params.items():
        with contextlib.nullcontext() if uses_muon(cfg, name) else lanes[name]:
            g = grads[name] if grad_scale is None else grads[name] * grad_scale
            new_params[name], new_state_of = _update_one(ops, cfg, name, p, g, state, lr, bias1, bias2, dtype)
        new_state.update(new_state_of)
    return new_params, new_state


def _update_one(ops, cfg: OptimConfig, name: str, p, g, state: dict, lr, bias1, bias2, dtype: str):
    """(new parameter, its new state slots) of one tensor."""
    new_state = {}
    decay = cfg.weight_decay if len(p.shape) >= 2 else 0.0
    if uses_muon(cfg, name):
        m = cfg.muon_momentum * state["momentum." + name] + g
        direction = newton_schulz(ops, g + cfg.muon_momentum * m, cfg.muon_ns_steps, dtype)
        direction = direction * (0.2 * max(p.shape) ** 0.5)
        new_state["momentum." + name] = m
    else:
        m = cfg.beta1 * state["exp_avg." + name] + (1.0 - cfg.beta1) * g
        v = cfg.beta2 * state["exp_avg_sq." + name] + (1.0 - cfg.beta2) * (g * g)
        direction = (m / bias1) / (ops.sqrt(v / bias2) + cfg.eps)
        new_state["exp_avg." + name] = m
        new_state["exp_avg_sq." + name] = v
    if decay:
        p = p * (1.0 - lr * decay)
    return p - lr * direction, new_state


def check_state(cfg: OptimConfig, params: dict, state: dict, where: str) -> None:
    """A resumed optimizer state must hold exactly the slots this optimizer and model need."""
    expected = {slot for name in params for slot in slots(cfg, name)}
    if set(state) != expected:
        missing = sorted(expected - set(state))[:1] or sorted(set(state) - expected)[:1]
        raise UserError(f"{where}: optimizer state does not match optim.name={cfg.name!r} (first mismatch: {missing[0]})")
