"""Typed model hyperparameters shared by the model code and the checkpoint loaders."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

__all__ = ["ModelConfig"]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of a decoder-only language model.

    One class serves the Llama family (Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2) and GPT-2;
    fields that an architecture does not use keep their defaults.
    """

    arch: Literal["llama", "gpt2"] = "llama"
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
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    name: str = "custom"

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling is not None else None

    @classmethod
    def tiny_llama(cls, **overrides: Any) -> ModelConfig:
        """A 2-layer Llama with GQA for tests (runs in milliseconds on CPU)."""
        return dataclasses.replace(cls(arch="llama", name="tiny-llama"), **overrides)

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
