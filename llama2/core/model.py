"""`Model`: a runtime plus its tokenizer, with forward and text generation."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import numpy as np

from llama2.core.backend import Runtime, RuntimeOptions
from llama2.core.config import ModelConfig
from llama2.core.generation import GenerationConfig, generate_ids, iter_generate
from llama2.core.graph import build_graph
from llama2.core.registry import BACKENDS

if TYPE_CHECKING:
    from llama2.data.tokenizer import Tokenizer

__all__ = ["Model", "create", "build_runtime"]

_GEN_FIELDS = {a.name for a in attrs.fields(GenerationConfig)}


def build_runtime(config: ModelConfig, backend: str = "mindspore", graph: Any = None, **options: Any) -> Runtime:
    """Lower `config`'s graph (or a rewritten `graph`) on `backend` with RuntimeOptions fields as keywords."""
    be = BACKENDS.get(backend)
    ok, why = be.available()
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not usable here: {why}")
    return be.build(graph if graph is not None else build_graph(config), RuntimeOptions(**options))


def create(
    config: ModelConfig | str,
    backend: str = "mindspore",
    seed: int = 0,
    tokenizer: Tokenizer | str | Path | None = None,
    **options: Any,
) -> Model:
    """A randomly initialized model from a config or preset name."""
    if isinstance(config, str):
        config = ModelConfig.from_preset(config)
    runtime = build_runtime(config, backend, seed=seed, **options)
    runtime.init_weights(seed)
    return Model(runtime, tokenizer)


class Model:
    """A Llama 2 model on one backend. Arrays in and out are numpy."""

    def __init__(self, runtime: Runtime, tokenizer: Tokenizer | str | Path | None = None) -> None:
        self.runtime = runtime
        # a path (str has an `encode` method too, so test for paths first) or any object without `encode`
        if isinstance(tokenizer, str | os.PathLike) or (tokenizer is not None and not hasattr(tokenizer, "encode")):
            from llama2.data.tokenizer import Tokenizer

            tokenizer = Tokenizer(tokenizer)
        if tokenizer is not None and tokenizer.vocab_size > runtime.config.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                f"{runtime.config.vocab_size}; they must match"
            )
        self.tokenizer = tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.runtime.config

    @property
    def backend(self) -> str:
        return self.runtime.backend_name

    def __repr__(self) -> str:
        return f"Model(backend={self.backend!r}, params={self.config.num_parameters():,}, config={self.config})"

    def num_parameters(self) -> int:
        return self.runtime.num_parameters()

    # ---- forward ---------------------------------------------------------------------------------------------
    def forward(self, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """float32 logits (batch, seq, vocab) for int ids (batch, seq); left padding via attention_mask."""
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be an integer array (batch, seq), got {ids.dtype} {ids.shape}")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"sequence of {ids.shape[1]} tokens exceeds max_seq_len={self.config.max_seq_len}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size}), got [{ids.min()}, {ids.max()}]")
        return self.runtime.forward(ids.astype(np.int32), attention_mask)

    __call__ = forward

    # ---- generation ------------------------------------------------------------------------------------------
    def _gen_config(self, options: dict[str, Any]) -> GenerationConfig:
        unknown = sorted(set(options) - _GEN_FIELDS)
        if unknown:
            raise TypeError(f"unknown generation option(s) {unknown}; known: {sorted(_GEN_FIELDS)}")
        return GenerationConfig(**options)

    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer: pass --tokenizer PATH on the command line (tokenizer=PATH to "
                "llama2.load in Python), or put tokenizer.model beside the weights"
            )
        return self.tokenizer

    def generate_ids(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        batch_size: int | None = None,
        eos_id: int | None = -1,
        **options: Any,
    ) -> list[list[int]]:
        """New token ids per prompt (EOS not included). eos_id=-1 means the tokenizer's EOS (2 without one)."""
        cfg = self._gen_config(options)
        if eos_id == -1:
            eos_id = self.tokenizer.eos_id if self.tokenizer is not None else 2
        stop = self._stop_checker(cfg)
        out: list[list[int]] = []
        for chunk in _chunks(list(prompts), batch_size):
            out.extend(generate_ids(self.runtime, chunk, cfg, eos_id=eos_id, should_stop=stop))
        return out

    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        batch_size: int | None = None,
        bos: bool = True,
        **options: Any,
    ) -> list[str]:
        """Continuations only (not the prompt), cut before the first stop string."""
        tok = self._need_tokenizer()
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = [tok.encode(p, bos=bos) for p in prompts]
        cfg = self._gen_config(options)
        new = self.generate_ids(ids, batch_size=batch_size, eos_id=tok.eos_id, **options)
        return [_cut_stop(tok.decode(n), cfg.stop) for n in new]

    def stream(self, prompt: str, *, bos: bool = True, **options: Any) -> Iterator[str]:
        """Yield text pieces of the continuation as they are decoded (never half a UTF-8 character)."""
        tok = self._need_tokenizer()
        cfg = self._gen_config(options)
        decoder = tok.decoder()
        text = ""
        emitted = 0
        for step_tokens, active in iter_generate(
            self.runtime, [tok.encode(prompt, bos=bos)], cfg, eos_id=tok.eos_id, should_stop=self._stop_checker(cfg)
        ):
            if not active[0] or int(step_tokens[0]) == tok.eos_id:
                break
            text += decoder.add(int(step_tokens[0]))
            piece, emitted = _safe_piece(text, emitted, cfg.stop)
            if piece:
                yield piece
        text += decoder.flush()
        final = _cut_stop(text, cfg.stop)
        if len(final) > emitted:
            yield final[emitted:]

    def _stop_checker(self, cfg: GenerationConfig):
        if not cfg.stop:
            return None
        tok = self._need_tokenizer()

        def should_stop(row: int, new_ids: list[int]) -> bool:
            tail = tok.decode(new_ids[-64:])
            return any(s in tail for s in cfg.stop)

        return should_stop

    # ---- persistence -----------------------------------------------------------------------------------------
    def save(self, path: str | Path, fmt: str = "hf", **options: Any) -> Path:
        """Write the weights (and tokenizer.model if known) in checkpoint format `fmt` (default HF)."""
        from llama2.core.formats import save_checkpoint

        path = Path(path)
        tok_path = getattr(self.tokenizer, "path", None)
        if tok_path is not None and fmt != "llama2c" and Path(tok_path).exists():
            options.setdefault("tokenizer_path", Path(tok_path))  # copied inside the atomic write
        save_checkpoint(path, fmt, self.config, self.runtime.state_dict(), **options)
        return path


def _chunks(items: list, size: int | None) -> Iterator[list]:
    if not size or size >= len(items):
        if items:
            yield items
        return
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _cut_stop(text: str, stops: tuple[str, ...]) -> str:
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _safe_piece(text: str, emitted: int, stops: tuple[str, ...]) -> tuple[str, int]:
    """The part of `text` after `emitted` that cannot become the start of a stop string."""
    limit = len(_cut_stop(text, stops))
    for s in stops:  # hold back a suffix that may be the start of a stop string
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                limit = min(limit, len(text) - k)
                break
    if limit <= emitted:
        return "", emitted
    return text[emitted:limit], limit
