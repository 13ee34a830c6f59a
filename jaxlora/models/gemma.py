"""Gemma 3, text only (Gemma Team, "Gemma 3 Technical Report", 2025).

The Llama block (`llama.py`) with Gemma's choices switched on (`GEMMA_BLOCK`): RMSNorm that
multiplies by (1 + weight), so the stored weights are zero at identity; four norms per block
(before and after attention, before and after the MLP); QK-norm; a GeGLU MLP (tanh GELU gate);
token embeddings scaled by sqrt(d); the LM head tied to the embedding. Attention interleaves
sliding-window (local) layers and global layers, the pattern and window from the checkpoint
(`ModelConfig.sliding_layers`, `sliding_window`), each kind with its own RoPE base
(`rope_local_theta` for local layers, `rope_theta` and any scaling for global ones), and the
scores are scaled by `query_pre_attn_scalar ** -0.5`.

Only the parameter structure and names are declared here; the forward is `llama.apply`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxlora.models import llama
from jaxlora.models.config import ModelConfig
from jaxlora.models.record import Family, TensorNames, hf_layer, init_layout

__all__ = ["FAMILY", "TENSORS", "GEMMA_BLOCK", "CHAT_TEMPLATE", "init"]

Array = jax.Array
Params = dict[str, Any]

GEMMA_BLOCK = llama.Block(norm_offset=1.0, gelu=True, sandwich=True, embed_scale=True)

# Gemma 3's chat template (the instruction-tuned checkpoints' `tokenizer_config.json`): turns
# framed by <start_of_turn>role ... <end_of_turn>, "assistant" written "model", a system
# message prepended to the first user turn. GGUF files of Gemma 3 do not carry it.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\\n'}}\n"
    "{%- endif -%}\n"
)


def init(cfg: ModelConfig, key: Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters: normal(0.02) kernels and embedding, zero (= identity) norm weights."""
    llama.check(cfg, "gemma3")
    if not cfg.tie_embeddings:
        raise ValueError("gemma3: the LM head is tied to the embedding (tie_embeddings=True)")
    if not cfg.qk_norm:
        raise ValueError("gemma3: QK-norm is part of the architecture (qk_norm=True)")
    return init_layout(llama.layout(cfg, GEMMA_BLOCK), key, cfg.num_layers, dtype)


def _shared(path: str) -> TensorNames:
    return next(t for t in llama.TENSORS if t.path == path)


# In the order a Hugging Face folder is written. Names the Llama family shares are taken from
# its table; `post_attention_layernorm` is a different norm in Gemma (after attention).
TENSORS: tuple[TensorNames, ...] = (
    *(_shared(p) for p in ("embed/embedding", "final_norm/scale", "layers/attn_norm/scale")),
    hf_layer("mlp_norm/scale", "pre_feedforward_layernorm.weight", "ffn_norm.weight"),
    hf_layer("attn_post_norm/scale", "post_attention_layernorm.weight",
             "post_attention_norm.weight"),
    hf_layer("mlp_post_norm/scale", "post_feedforward_layernorm.weight", "post_ffw_norm.weight"),
    *(t for t in llama.TENSORS if t.path.startswith(("layers/attn/", "layers/mlp/"))
      and not t.path.endswith("/bias")),
)

FAMILY = Family(
    arch="gemma3", init=init, apply=functools.partial(llama.apply, block=GEMMA_BLOCK),
    tensors=TENSORS, embedding="embed/embedding", can_untie=False, learned_positions=False,
    hf_ignored=r"rotary_emb\.inv_freq$", gguf_norm_shift=1.0, chat_template=CHAT_TEMPLATE,
    stop_tokens=("<end_of_turn>",),
)
