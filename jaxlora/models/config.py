"""Typed model hyperparameters shared by the model code and the checkpoint loaders."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

__all__ = ["ModelConfig"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a decoder-only language model.

    One class serves the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2, Qwen3),
    Gemma 3 (text) and GPT-2; fields that an architecture does not use keep their defaults.
    """

    arch: Literal["llama", "gpt2", "gemma3"] = "llama"
    vocab_size: int = 256
    hidden_size: int = 64  # d
    num_layers: int = 2  # L
    num_heads: int = 4
    num_kv_heads: int = 2  # grouped-query attention; == num_heads for plain multi-head
    head_dim: int = 16
    intermediate_size: int = 128  # MLP width (ffn)
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    # Llama 3 style RoPE scaling, e.g. {"rope_type": "llama3", "factor": 8.0,
    # "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}.
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    norm_eps: float = 1e-5  # RMSNorm eps (llama) or LayerNorm eps (gpt2)
    tie_embeddings: bool = True
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, Gemma 3)
    # Sliding-window (local) attention: a query at position i sees keys j with i - j < window,
    # in the layers listed in `sliding_layers`; the other layers attend globally (Gemma 3).
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()
    rope_local_theta: float | None = None  # RoPE base of the sliding layers (None: rope_theta)
    query_pre_attn_scalar: float | None = None  # scores scaled by its -1/2 (None: head_dim)
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    name: str = "custom"

    def __post_init__(self) -> None:
        bad = [i for i in self.sliding_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"ModelConfig.sliding_layers: {bad} are not layers of a "
                             f"{self.num_layers}-layer model")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("ModelConfig.sliding_layers needs a sliding_window > 0")

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @property
    def attn_scale(self) -> float:
        """The factor the attention scores are multiplied by."""
        return 1.0 / math.sqrt(self.query_pre_attn_scalar or self.head_dim)

    @staticmethod
    def sliding_pattern(num_layers: int, period: int) -> tuple[int, ...]:
        """Gemma's interleave: every `period`-th layer global, the others sliding-window."""
        return tuple(i for i in range(num_layers) if (i + 1) % period)

    @classmethod
    def tiny_llama(cls, **overrides: Any) -> ModelConfig:
        """A 2-layer Llama with GQA for tests (runs in milliseconds on CPU)."""
        return dataclasses.replace(cls(arch="llama", name="tiny-llama"), **overrides)

    @classmethod
    def tiny_qwen3(cls, **overrides: Any) -> ModelConfig:
        """A 2-layer Qwen3 (Llama block + QK-norm, head_dim != d / heads) for tests."""
        base = cls(arch="llama", qk_norm=True, head_dim=8, rope_theta=1e6, norm_eps=1e-6,
                   name="tiny-qwen3")
        return dataclasses.replace(base, **overrides)

    @classmethod
    def tiny_gemma3(cls, **overrides: Any) -> ModelConfig:
        """A 6-layer Gemma 3 for tests: window 4, layers 0-1 and 3-4 local, 2 and 5 global."""
        base = cls(
            arch="gemma3", num_layers=6, num_heads=4, num_kv_heads=1, head_dim=16,
            intermediate_size=96, rope_theta=1e6, rope_local_theta=1e4, norm_eps=1e-6,
            qk_norm=True, sliding_window=4, sliding_layers=cls.sliding_pattern(6, 3),
            query_pre_attn_scalar=24.0, tie_embeddings=True, bos_token_id=2, eos_token_id=1,
            name="tiny-gemma3",
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def tiny_gpt2(cls, **overrides: Any) -> ModelConfig:
        """A 2-layer GPT-2 for tests."""
        base = cls(
            arch="gpt2", num_heads=4, num_kv_heads=4, head_dim=16, intermediate_size=256,
            max_position_embeddings=128, norm_eps=1e-5, tie_embeddings=True,
            bos_token_id=None, eos_token_id=0, name="tiny-gpt2",
        )
        return dataclasses.replace(base, **overrides)

    @classmethod
    def smollm2_135m(cls) -> ModelConfig:
        """SmolLM2-135M(-Instruct): 30 layers, d=576, 9 heads, 3 KV heads, MLP 1536."""
        return cls(
            arch="llama", vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9,
            num_kv_heads=3, head_dim=64, intermediate_size=1536, max_position_embeddings=8192,
            rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True, bos_token_id=1,
            eos_token_id=2, name="smollm2-135m",
        )
