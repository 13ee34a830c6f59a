"""Autoregressive generation with a preallocated KV cache, with or without LoRA adapters.

One jitted program per (batch, padded prompt length, max_new_tokens, sampling settings):
the prompt is prefilled in one `decode_step`, then a `lax.while_loop` produces one token
per iteration until `max_new_tokens` or until every row has emitted EOS. The cache never
grows: it has `padded_prompt + max_new_tokens` slots from the start.

Batches of prompts are *left padded* to a common length (rounded up to a multiple of
`bucket` so nearby lengths share a compile). Padding slots are masked out of attention and
positions count real tokens only, so each row's output equals its unbatched generation.

Sampling: greedy (temperature 0, the default), or temperature with optional top-k
(Fan et al. 2018) and top-p / nucleus (Holtzman et al. 2020) filtering.

Adapters are attached once before the loop (`lora.attach`), so the loop runs the same
`decode_step` as the base model. Per-row adapters would keep this structure (one base
projection for the batch plus a per-row low-rank path inside `lora.linear`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora import lora, models
from jaxlora.models import ModelConfig, decode_step, init_cache

__all__ = ["generate", "generate_tokens", "sample_logits"]

Array = jax.Array


def sample_logits(logits: Array, key: Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
    """Pick one token per row from float logits `[B, V]` -> int32 `[B]`.

    temperature 0 is greedy (argmax; top_k/top_p ignored). Otherwise logits are divided by the
    temperature, restricted to the `top_k` largest (if > 0) and to the smallest set whose
    probability reaches `top_p` (if < 1), then sampled.
    """
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    neg = jnp.finfo(jnp.float32).min
    lg = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(lg, min(top_k, lg.shape[-1]))[0][:, -1:]  # [B, 1]
        lg = jnp.where(lg < kth, neg, lg)
    if top_p < 1.0:
        srt = -jnp.sort(-lg, axis=-1)  # [B, V] descending
        probs = jax.nn.softmax(srt, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
        keep = before < top_p  # the first token is always kept
        cutoff = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
        lg = jnp.where(lg < cutoff, neg, lg)
    return jax.random.categorical(key, lg, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "max_new_tokens", "temperature", "top_k", "top_p", "compute_dtype"),
)
def _generate(cfg: ModelConfig, params: Any, adapters: Any, tokens: Array, valid: Array,
              key: Array, eos: Array, pad_id: Array, *, max_new_tokens: int, temperature: float,
              top_k: int, top_p: float, compute_dtype: Any) -> Array:
    """tokens/valid: [B, P] left-padded prompts -> [B, max_new_tokens] new tokens (pad after EOS).

    eos: [n] int32 stop ids (-1 for none) and pad_id: int32 scalar are traced, so changing
    them does not recompile.
    """
    if adapters is not None:
        params = lora.attach(params, adapters)
    b, p = tokens.shape
    cache = init_cache(cfg, b, p + max_new_tokens, compute_dtype)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # [B, P]
    logits, cache = decode_step(cfg, params, tokens, positions, cache, token_valid=valid,
                                compute_dtype=compute_dtype)
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

    tok = sample(logits, jax.random.fold_in(key, 0))  # [B]
    out = jnp.broadcast_to(pad_id, (b, max_new_tokens)).astype(jnp.int32).at[:, 0].set(tok)
    done = jnp.isin(tok, eos)
    pos = jnp.sum(valid, axis=1).astype(jnp.int32)  # [B] position of `tok`

    def cond(state):
        i, _, _, _, done, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, pos, cache, done, out = state
        logits, cache = decode_step(cfg, params, tok[:, None], pos[:, None], cache,
                                    compute_dtype=compute_dtype)
        new = sample(logits, jax.random.fold_in(key, i))
        new = jnp.where(done, pad_id, new)
        out = jax.lax.dynamic_update_slice(out, new[:, None], (jnp.zeros((), jnp.int32), i))
        return i + 1, new, pos + 1, cache, done | jnp.isin(new, eos), out

    state = (jnp.ones((), jnp.int32), tok, pos, cache, done, out)
    return jax.lax.while_loop(cond, body, state)[-1]


def _as_tuple(eos_id: int | Sequence[int] | None) -> tuple[int, ...]:
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def generate_tokens(cfg: ModelConfig, params: Any, prompts: Sequence[Sequence[int]], *,
                    adapters: Any = None, max_new_tokens: int = 64, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    eos_id: int | Sequence[int] | None = None, pad_id: int = 0,
                    compute_dtype: Any = jnp.float32, bucket: int = 32) -> list[list[int]]:
    """Generate continuations of token-id prompts.

    Args:
      cfg, params: the model (float or QTensor leaves). adapters: optional LoRA adapters.
      prompts: one list of token ids per row (each non-empty).
      max_new_tokens: at most this many new tokens per row.
      temperature, top_k, top_p, seed: sampling (temperature 0 = greedy, deterministic).
      eos_id: stop token(s); defaults to `cfg.eos_token_id`. pad_id: filler id for padding.
      bucket: the padded prompt length is rounded up to a multiple of this.

    Returns:
      Per row, the new tokens up to (not including) the first EOS.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must have at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens}")
    eos_ids = _as_tuple(cfg.eos_token_id if eos_id is None else eos_id)
    longest = max(len(p) for p in prompts)
    p_len = -(-longest // bucket) * bucket
    if (models.family(cfg).learned_positions
            and longest + max_new_tokens > cfg.max_position_embeddings):
        raise ValueError(f"generate: prompt ({longest}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds the {cfg.max_position_embeddings} positions of {cfg.arch}")
    tokens = np.full((len(prompts), p_len), pad_id, np.int32)
    valid = np.zeros((len(prompts), p_len), bool)
    for r, ids in enumerate(prompts):
        tokens[r, p_len - len(ids):] = ids
        valid[r, p_len - len(ids):] = True
    out = _generate(cfg, params, adapters, jnp.asarray(tokens), jnp.asarray(valid),
                    jax.random.key(seed), jnp.asarray(eos_ids or (-1,), jnp.int32),
                    jnp.asarray(pad_id, jnp.int32), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                    compute_dtype=compute_dtype)
    result = []
    for row in np.asarray(out).tolist():
        cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
        result.append(row[:cut])
    return result


def generate(cfg: ModelConfig, params: Any, tokenizer: Any, prompts: Sequence[str], *,
             adapters: Any = None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, chat: bool = False,
             compute_dtype: Any = jnp.float32) -> list[str]:
    """Generate text continuations (or chat answers with `chat=True`) for a batch of prompts.

    With `chat=True` each prompt becomes one user message rendered by
    `tokenizer.apply_chat_template(..., add_generation_prompt=True)`.
    Returns the decoded new text per prompt (EOS and everything after it removed).
    """
    if chat:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               add_generation_prompt=True) for p in prompts]
    else:
        texts = list(prompts)
    ids = [tokenizer.encode(t) for t in texts]
    eos = tokenizer.eos_id if tokenizer.eos_id is not None else cfg.eos_token_id
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (eos if eos is not None else 0)
    # The family's end-of-turn tokens (Gemma's <end_of_turn>) stop a reply as EOS does.
    stops = [tokenizer.token_to_id(t) for t in models.family(cfg).stop_tokens]
    stop_ids = [i for i in (eos, *stops) if i is not None]
    outs = generate_tokens(cfg, params, ids, adapters=adapters, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           eos_id=stop_ids, pad_id=pad, compute_dtype=compute_dtype)
    return [tokenizer.decode(o) for o in outs]
