"""Learning-rate schedules as pure functions of the step.

`step` is the 0-based index of the optimizer update about to be made (the first update uses `step=0`).
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine", "warmup_constant", "SCHEDULES", "lr_at"]


def warmup_cosine(step: int, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int) -> float:
    """Linear warmup from lr/warmup_steps up to `lr`, then cosine decay to `min_lr` at `total_steps`.

    Update `step` (0-based) during warmup uses lr * (step + 1) / warmup_steps, so the first update is never 0 and
    update `warmup_steps - 1` uses the full `lr`. After warmup the rate follows
    min_lr + (lr - min_lr) * (1 + cos(pi * t)) / 2 with t = (step - warmup_steps) / (total_steps - warmup_steps),
    clamped to [0, 1] (steps past `total_steps` stay at `min_lr`).
    """
    _check(step, lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay = total_steps - warmup_steps
    if decay <= 0:
        return lr
    t = min(max((step - warmup_steps) / decay, 0.0), 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_constant(step: int, *, lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int) -> float:
    """Linear warmup (as in `warmup_cosine`), then a constant `lr`; `min_lr` is unused."""
    _check(step, lr, min_lr, warmup_steps, total_steps)
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    return lr


SCHEDULES = {"cosine": warmup_cosine, "constant": warmup_constant}


def lr_at(
    step: int, *, schedule: str = "cosine", lr: float, min_lr: float = 0.0, warmup_steps: int = 0, total_steps: int
) -> float:
    """The learning rate of update `step` under the named schedule ("cosine" or "constant")."""
    try:
        fn = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown lr schedule {schedule!r}; known: {', '.join(sorted(SCHEDULES))}") from None
    return fn(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)


def _check(step: int, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if lr < 0 or min_lr < 0:
        raise ValueError(f"learning rates must be >= 0, got lr={lr}, min_lr={min_lr}")
