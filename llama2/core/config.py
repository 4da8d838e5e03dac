"""Architecture-only configuration: `ModelConfig` and its presets."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["ModelConfig", "PRESETS"]


def _positive(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if value <= 0:
        raise ValueError(f"ModelConfig.{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class ModelConfig:
    """Llama 2 architecture: sizes only, no training or device settings.

    Parameter names follow Meta's `params.json` (`dim`, `n_layers`, ...); `hidden_dim` is the SwiGLU width.
    """

    dim: int = attrs.field(default=4096, validator=_positive)
    n_layers: int = attrs.field(default=32, validator=_positive)
    n_heads: int = attrs.field(default=32, validator=_positive)
    n_kv_heads: int = attrs.field(default=None, validator=_positive)
    vocab_size: int = attrs.field(default=32000, validator=_positive)
    hidden_dim: int = attrs.field(default=11008, validator=_positive)
    norm_eps: float = attrs.field(default=1e-5, validator=_positive)
    rope_theta: float = attrs.field(default=10000.0, validator=_positive)
    max_seq_len: int = attrs.field(default=4096, validator=_positive)
    tie_embeddings: bool = False

    def __attrs_post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (`llama2-7b`, `llama2-13b`, `llama2-70b`, `small`, `tiny`), optionally overridden."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
        return attrs.evolve(base, **overrides) if overrides else base

    def num_parameters(self) -> int:
        """Exact number of parameters (the LM head counted unless tied)."""
        d, h, kv = self.dim, self.hidden_dim, self.kv_dim
        per_layer = d * d * 2 + d * kv * 2 + 3 * d * h + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * per_layer + d + head

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Build from a plain dict; unknown keys are an error naming `source`."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ModelConfig field(s) {unknown}; expected some of {sorted(known)}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"{source}: {exc}") from None

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Translate a Hugging Face `LlamaConfig` dict; absent fields take `LlamaConfig`'s defaults.

        Fields this architecture cannot represent (head_dim != hidden_size / num_attention_heads, attention or MLP
        biases, RoPE scaling) are an error naming `source` and the field. RoPE theta is read from `rope_theta` or
        from transformers 5's `rope_parameters` (rope_type "default" only).
        """
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in hf]
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing} required for a Llama config")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; Llama 2 needs 'silu'")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"{source}: {flag}={hf[flag]!r} is not supported (Llama 2 projections have no bias)")
        dim, n_heads = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is not None and n_heads and head_dim * n_heads != dim:
            raise ValueError(
                f"{source}: head_dim={head_dim} but hidden_size / num_attention_heads = {dim} / {n_heads}; "
                "only head_dim == hidden_size / num_attention_heads is supported"
            )
        return cls(
            dim=dim,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            vocab_size=hf["vocab_size"],
            hidden_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])),
            rope_theta=_hf_rope_theta(hf, source),
            max_seq_len=int(hf.get("max_position_embeddings", _HF_DEFAULTS["max_position_embeddings"])),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for this architecture."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "vocab_size": self.vocab_size,
            "intermediate_size": self.hidden_dim,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "float32",
        }


# transformers' LlamaConfig defaults for the fields a config.json may leave out
_HF_DEFAULTS: dict[str, Any] = {"rms_norm_eps": 1e-6, "max_position_embeddings": 2048, "rope_theta": 10000.0}


def _hf_rope_theta(hf: dict[str, Any], source: str) -> float:
    """RoPE theta of an HF config: `rope_theta` (transformers 4) or `rope_parameters` (transformers 5); scaled
    RoPE (`rope_scaling`, or a rope_type other than "default") is an error naming the field."""
    theta = hf.get("rope_theta")
    for field in ("rope_scaling", "rope_parameters"):
        value = hf.get(field)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ValueError(f"{source}: {field}={value!r}; expected an object or null")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind != "default":
            raise ValueError(
                f"{source}: {field}={value!r} asks for {kind!r} RoPE scaling, which is not supported "
                "(Llama 2 uses plain RoPE: rope_type 'default')"
            )
        extra = sorted(set(value) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise ValueError(f"{source}: {field} has unsupported key(s) {extra} (only rope_type and rope_theta)")
        if "rope_theta" in value:
            if theta is not None and float(value["rope_theta"]) != float(theta):
                raise ValueError(
                    f"{source}: rope_theta={theta} but {field}.rope_theta={value['rope_theta']}; they must agree"
                )
            theta = value["rope_theta"]
    return float(theta if theta is not None else _HF_DEFAULTS["rope_theta"])


PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(dim=4096, n_layers=32, n_heads=32, hidden_dim=11008),
    "llama2-13b": ModelConfig(dim=5120, n_layers=40, n_heads=40, hidden_dim=13824),
    "llama2-70b": ModelConfig(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672),
    # CPU-sized presets. `small` is llama2.c's stories15M shape.
    "small": ModelConfig(dim=288, n_layers=6, n_heads=6, hidden_dim=768, vocab_size=32000, max_seq_len=256),
    "tiny": ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=176, vocab_size=4096, max_seq_len=256),
}
