"""Backend-neutral generation: logits processors, sampling, and the KV-cache decoding loop.

Prompts of different lengths are left-padded into one batch; each row keeps its own RoPE positions and a key mask,
so a row's tokens are the same as when it is generated alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs
import numpy as np

from llama2.core.backend import Runtime

__all__ = [
    "GenerationConfig",
    "apply_repetition_penalty",
    "top_k_filter",
    "top_p_filter",
    "select_next",
    "iter_generate",
    "generate_ids",
    "bucketed_lengths",
]


@attrs.frozen(kw_only=True)
class GenerationConfig:
    """Decoding options. temperature 0 means greedy; top_k 0 and top_p 1 disable those filters.

    on_overflow: what happens when prompt + max_new_tokens exceed the model's max_seq_len: "stop" ends generation
    at the context limit, "error" raises before decoding.
    """

    max_new_tokens: int = attrs.field(default=128, validator=attrs.validators.ge(0))
    temperature: float = attrs.field(default=0.0, validator=attrs.validators.ge(0.0))
    top_k: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    top_p: float = attrs.field(default=1.0, validator=[attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    repetition_penalty: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    stop: tuple[str, ...] = attrs.field(default=(), converter=lambda s: (s,) if isinstance(s, str) else tuple(s or ()))
    seed: int | None = None
    on_overflow: str = attrs.field(default="stop", validator=attrs.validators.in_(("stop", "error")))


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """CTRL-style penalty: for tokens already seen, divide positive logits and multiply negative ones by `penalty`.

    logits (batch, vocab); seen (batch, vocab) bool.
    """
    if penalty == 1.0:
        return logits
    penalized = np.where(logits > 0, logits / penalty, logits * penalty)
    return np.where(seen, penalized, logits)


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits per row (ties with the k-th kept); others become -inf."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = np.partition(logits, -k, axis=-1)[:, -k][:, None]
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits: np.ndarray, p: float) -> np.ndarray:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p (never empty)."""
    if p >= 1.0:
        return logits
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    probs = _softmax(sorted_logits)
    cum = np.cumsum(probs, axis=-1)
    # Token i is kept if the mass before it is still below p (with a rounding allowance, so that exactly
    # reaching p counts as reaching it); the first token is always kept.
    keep_sorted = (cum - probs) < p - 1e-9
    keep_sorted[:, 0] = True
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=-1, keepdims=True)


def select_next(logits: np.ndarray, seen: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> np.ndarray:
    """Next token per row from last-position logits (batch, vocab), after penalty, temperature, top-k, top-p."""
    x = apply_repetition_penalty(logits.astype(np.float64), seen, cfg.repetition_penalty)
    if cfg.temperature == 0.0:
        return np.argmax(x, axis=-1)
    x = top_p_filter(top_k_filter(x / cfg.temperature, cfg.top_k), cfg.top_p)
    probs = _softmax(x)
    u = rng.random((x.shape[0], 1))
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), x.shape[-1] - 1)


def iter_generate(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (batch,), active (batch,) bool) once per decoding step.

    `active[i]` is False for rows that had already finished before this step (their token is filler). A row
    finishes at `eos_id` (the EOS token is yielded, flagged active, so callers can drop it), when
    `should_stop(row, new_ids)` says so, or at the context limit.
    """
    b = len(prompts)
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    if b == 0:
        return
    if lens.min() == 0:
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    max_seq = runtime.config.max_seq_len
    width = int(lens.max())
    if width > max_seq:
        raise ValueError(f"prompt of {width} tokens exceeds the model's max_seq_len={max_seq}")
    wanted = width + cfg.max_new_tokens
    if wanted > max_seq and cfg.on_overflow == "error":
        raise ValueError(
            f"prompt ({width} tokens) + max_new_tokens ({cfg.max_new_tokens}) = {wanted} exceeds the model's "
            f"max_seq_len={max_seq}; lower max_new_tokens or use on_overflow='stop'"
        )
    if cfg.max_new_tokens == 0:
        return
    steps = min(cfg.max_new_tokens, max_seq - int(lens.max()))  # new tokens that fit in the context
    width, cache_len = bucketed_lengths(width, steps, max_seq, getattr(runtime, "length_bucket", 1))
    total = width + steps  # slots actually used: (bucketed) prompt width, then one per new token
    ids = np.full((b, width), pad_id, dtype=np.int32)
    mask = np.zeros((b, width), dtype=np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = np.asarray(p, dtype=np.int32)
        mask[i, width - len(p) :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    kv_mask = np.zeros((b, cache_len), dtype=np.int32)
    kv_mask[:, :width] = mask
    vocab = runtime.config.vocab_size
    seen = np.zeros((b, vocab), dtype=bool)
    if cfg.repetition_penalty != 1.0:
        for i, p in enumerate(prompts):
            seen[i, np.asarray(p, dtype=np.int64)] = True
    rng = np.random.default_rng(cfg.seed)
    cache = runtime.new_cache(b, cache_len)
    logits = runtime.decode(cache, ids, positions, kv_mask, start=0, last_only=True)[:, -1]
    next_pos = lens.astype(np.int32)
    finished = np.zeros(b, dtype=bool)
    new_ids: list[list[int]] = [[] for _ in range(b)]
    for step in range(cfg.max_new_tokens):
        tok = select_next(logits, seen, cfg, rng).astype(np.int32)
        active = ~finished
        tok = np.where(active, tok, pad_id).astype(np.int32)
        for i in np.nonzero(active)[0]:
            t = int(tok[i])
            new_ids[i].append(t)
            seen[i, t] = True
            if (eos_id is not None and t == eos_id) or (should_stop is not None and should_stop(int(i), new_ids[i])):
                finished[i] = True
        yield tok, active
        slot = width + step  # cache slot of the token just chosen; the whole sequence stays within `total`
        if finished.all() or slot + 1 >= total:
            return
        kv_mask[:, slot] = 1
        logits = runtime.decode(cache, tok[:, None], next_pos[:, None], kv_mask, start=slot, last_only=True)[:, -1]
        next_pos = next_pos + 1


def bucketed_lengths(width: int, steps: int, max_seq: int, bucket: int) -> tuple[int, int]:
    """(prompt width, cache length) rounded up to multiples of `bucket` where the context allows.

    A compiled backend (MindSpore `jit`) compiles once per input shape; extra left padding (masked, so the logits
    do not change) and a rounded-up cache let prompts of nearby lengths share one compiled prefill and decode step.
    """
    if bucket <= 1:
        return width, width + steps
    up = -(-width // bucket) * bucket
    width = min(up, max_seq - steps)  # never trade context for padding
    return width, min(-(-(width + steps) // bucket) * bucket, max_seq)


def generate_ids(
    runtime: Runtime,
    prompts: Sequence[Sequence[int]],
    cfg: GenerationConfig,
    eos_id: int | None = None,
    pad_id: int = 0,
    should_stop: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """New ids per prompt (EOS excluded), one batch."""
    out: list[list[int]] = [[] for _ in prompts]
    for tok, active in iter_generate(runtime, prompts, cfg, eos_id, pad_id, should_stop):
        for i in np.nonzero(active)[0]:
            t = int(tok[i])
            if eos_id is None or t != eos_id:
                out[i].append(t)
    return out
