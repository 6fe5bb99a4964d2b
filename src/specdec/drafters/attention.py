"""Attention for drafters: KV injection of target context, with a dense-mask SDPA reference and flex attention.

DSpark block queries attend the shared target context strictly before their anchor and every slot of their
own block (bidirectionally). The dense boolean mask runs forward and backward on any device; the flex
BlockMask encodes the same rule for CUDA, where it skips fully masked tiles.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm, rotate_half

from specdec.drafters.config import DSparkConfig

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - torch builds without flex attention
    BlockMask = None
    create_block_mask = flex_attention = None

AttentionMask = torch.Tensor | None  # a dense bool mask [B, 1, Q, KV], a BlockMask, or None (attend all)


def dspark_dense_mask(anchors: torch.Tensor, keep: torch.Tensor, context_length: int, block_size: int) -> torch.Tensor:
    """[B, 1, N*K, S + N*K] bool: context keys before the block's anchor (kept blocks only) + own block."""
    num_blocks = anchors.shape[1]
    device = anchors.device
    query_block = torch.arange(num_blocks * block_size, device=device) // block_size  # [Q]
    kv = torch.arange(context_length + num_blocks * block_size, device=device)  # [KV]
    anchor_of_query = anchors[:, query_block]  # [B, Q]
    keep_of_query = keep[:, query_block]
    context = (kv[None, None, :] < anchor_of_query[:, :, None]) & keep_of_query[:, :, None]
    context &= (kv < context_length)[None, None, :]
    own_block = (kv[None, :] >= context_length) & ((kv[None, :] - context_length) // block_size == query_block[:, None])
    return (context | own_block[None]).unsqueeze(1)


def dspark_mask_mod(anchors: torch.Tensor, keep: torch.Tensor, context_length: int, block_size: int) -> Callable:
    """The same rule as ``dspark_dense_mask``, as a flex-attention mask_mod."""

    def mask_mod(b, h, q, kv):
        block = q // block_size
        context = (kv < context_length) & (kv < anchors[b, block]) & keep[b, block]
        own_block = (kv >= context_length) & ((kv - context_length) // block_size == block)
        return context | own_block

    return mask_mod


def dspark_block_mask(anchors: torch.Tensor, keep: torch.Tensor, context_length: int, block_size: int):
    """Flex BlockMask for DSpark training blocks (CUDA fast path)."""
    if create_block_mask is None:
        raise RuntimeError("this torch build has no flex attention; use attention_backend='sdpa'")
    batch, num_blocks = anchors.shape
    query_length = num_blocks * block_size
    return create_block_mask(
        dspark_mask_mod(anchors, keep, context_length, block_size),
        B=batch,
        H=None,
        Q_LEN=query_length,
        KV_LEN=context_length + query_length,
        device=anchors.device,
    )


@cache
def _compiled_flex_attention() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


def choose_attention_backend(requested: str, device: torch.device) -> str:
    """``auto`` picks flex attention on CUDA (when available) and the dense SDPA reference elsewhere."""
    if requested != "auto":
        return requested
    return "flex" if device.type == "cuda" and flex_attention is not None else "sdpa"


FEW_QUERIES = 32  # below this many queries, inference attention is written out (see few_query_attention)


def few_query_attention(query, key, value, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Grouped-query softmax attention written as two matmuls and an fp32 softmax.

    Decoding attends a handful of queries (a block, a verification chunk) over a long buffer; the CPU SDPA
    kernels pay a fixed cost per call that dwarfs that work, while this form lets a compiled graph fuse the
    mask and scaling into its neighbours. ``mask`` is a bool mask broadcastable to [B, 1, Q, KV] (or None).
    """
    batch, heads, width, head_dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * width, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).view(batch, kv_heads, groups, width, length)
    scores = scores.float() * scale
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).to(value.dtype).view(batch, kv_heads, groups * width, length)
    return torch.matmul(weights, value).view(batch, heads, width, head_dim)


def attend(query, key, value, mask, scale: float) -> torch.Tensor:
    """Scaled dot-product attention with GQA; ``mask`` is a dense bool mask, a BlockMask, or None."""
    if BlockMask is not None and isinstance(mask, BlockMask):
        run = _compiled_flex_attention() if query.is_cuda else flex_attention
        return run(query, key, value, block_mask=mask, scale=scale, enable_gqa=True)
    if query.shape[-2] <= FEW_QUERIES and not torch.is_grad_enabled() and not query.is_cuda:
        return few_query_attention(query, key, value, mask, scale)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)


class KVInjectionAttention(nn.Module):
    """Queries from block tokens; keys/values from the shared target context followed by the block.

    The same q/k/v projections serve context and block, and the context is never updated across layers.
    Gemma 4-style blocks normalise values (without scale), attend with scaling 1.0, and may reuse the key
    projection as values (``attention_k_eq_v``).
    """

    def __init__(self, config: DSparkConfig) -> None:
        super().__init__()
        gemma = config.block_style == "gemma4"
        norm = Gemma4RMSNorm if gemma else Qwen3RMSNorm
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.scaling = 1.0 if gemma else config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        share_keys = gemma and config.attention_k_eq_v
        self.v_proj = None if share_keys else nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=bias)
        self.q_norm = norm(self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = norm(self.head_dim, eps=config.rms_norm_eps)
        self.v_norm = Gemma4RMSNorm(self.head_dim, eps=config.rms_norm_eps, with_scale=False) if gemma else None

    def _heads(self, x: torch.Tensor, projection: nn.Linear, norm: nn.Module | None = None) -> torch.Tensor:
        states = projection(x).view(*x.shape[:-1], -1, self.head_dim)
        if norm is not None:
            states = norm(states)
        return states.transpose(1, 2)  # [B, heads, T, D]

    def _keys_values(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        raw_keys = self.k_proj(x).view(*x.shape[:-1], -1, self.head_dim)
        raw_values = raw_keys if self.v_proj is None else self.v_proj(x).view(*x.shape[:-1], -1, self.head_dim)
        keys = self.k_norm(raw_keys).transpose(1, 2)
        values = (self.v_norm(raw_values) if self.v_norm is not None else raw_values).transpose(1, 2)
        cos, sin = rotary
        keys = keys * cos.unsqueeze(1) + rotate_half(keys) * sin.unsqueeze(1)
        return keys, values

    def context_key_values(self, context: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor]):
        """Keys (normed, rotated) and values of context positions, reusable across blocks at inference."""
        return self._keys_values(context, rotary)

    def forward(
        self,
        hidden: torch.Tensor,
        block_rotary: tuple[torch.Tensor, torch.Tensor],
        context_keys: torch.Tensor,
        context_values: torch.Tensor,
        mask: AttentionMask,
    ) -> torch.Tensor:
        query = self._heads(hidden, self.q_proj, self.q_norm)
        cos, sin = block_rotary
        query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)
        keys, values = self._keys_values(hidden, block_rotary)
        keys = torch.cat([context_keys, keys], dim=2)
        values = torch.cat([context_values, values], dim=2)
        output = attend(query, keys, values, mask, self.scaling)
        return self.o_proj(output.transpose(1, 2).reshape(*hidden.shape[:-1], -1))
