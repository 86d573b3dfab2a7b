# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional attention (encoder, non-causal).

    y = A_light(x) + lambda_q * A_heavy(x_q, lambda_kv * x_kv)

Light branch: local attention (every token attends to the `light_window_size` tokens on each side) with few
heads: on GPUs FlexAttention over the window's tiles (or, with attention dropout, one SDPA call over blocked
windows; sliding_window.py), elsewhere the local-attention package, the reference both are tested against.
Heavy branch: full attention from routed queries to routed keys/values with more heads; the heavy heads are split
evenly among `num_routed_kv` key/value routing sets. `RoutedAttentionBase` holds the heavy branch that the cross
and image attention (cross_attention.py, image_attention.py) share with this layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from local_attention import LocalAttention
from torch import nn

from .masked_sdpa import masked_sdpa
from .rotary import RotaryEmbedding, apply_rotary
from .router import CoordinateDescentRouter, RouterOutput, gather_tokens, scatter_tokens, validate_amount
from .sliding_window import FLEX_MIN_HEAD_DIM, flex_sliding_window_attention, sliding_window_attention


def project(x: torch.Tensor, *projections: nn.Linear) -> tuple[torch.Tensor, ...]:
    """`x` `(..., dim)` through several bias-free projections as one matmul: x is read once, and the backward pass
    makes one gradient matmul back to x instead of one per projection plus the sums."""
    weight = torch.cat([projection.weight for projection in projections])
    return F.linear(x, weight).split([projection.out_features for projection in projections], dim=-1)


def light_projections(dim: int, heads: int, head_dim: int) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
    """The light branch's bias-free query, key, value and output projections."""
    inner = heads * head_dim
    return (
        nn.Linear(dim, inner, bias=False),
        nn.Linear(dim, inner, bias=False),
        nn.Linear(dim, inner, bias=False),
        nn.Linear(inner, dim, bias=False),
    )


def positions_at(positions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Positions `(batch, n)` or `(batch, n, axes)` of the tokens at `(batch, sets, k)` indices -> `(batch, sets, k)`
    or `(batch, sets, k, axes)`."""
    if positions.dim() == 2:
        return positions.gather(1, indices.flatten(1)).view_as(indices)
    return gather_tokens(positions, indices)


class RoutedAttentionBase(nn.Module):
    """The heavy branch every encoder-style routed attention shares (self, cross and image attention), and the
    heavy projections the causal attention uses too: full attention from routed queries to routed keys/values,
    heavy heads split evenly among `num_routed_kv` key/value routing sets, the routing options, and the learned
    output for unrouted queries.

    Args:
        dim: width of the queries' tokens (and of the output).
        context_dim: width of the tokens keys/values are routed from (default `dim`).
        heavy_heads, heavy_dim_head: heavy branch heads and head width.
        num_routed_kv: key/value routing sets.
        multiply_keys_by_score, multiply_queries_by_score, learned_unrouted_output: routing options (see
            `ConditionalRoutedAttention`).
        rotary_theta: rotary base; None for no position information in the heavy branch (cross attention).
        rotary_axes: position axes (1 for sequences, 2 for images).
        dropout: attention-probability dropout.
    """

    def __init__(
        self,
        dim: int,
        *,
        context_dim: int | None = None,
        heavy_heads: int,
        heavy_dim_head: int,
        num_routed_kv: int,
        multiply_keys_by_score: bool,
        multiply_queries_by_score: bool,
        learned_unrouted_output: bool,
        rotary_theta: float | None,
        rotary_axes: int = 1,
        dropout: float,
    ):
        super().__init__()
        if heavy_heads % num_routed_kv:
            raise ValueError(
                f"heavy_heads ({heavy_heads}) must be divisible by num_routed_kv ({num_routed_kv}): "
                "the heavy heads are split evenly among the key/value routing sets."
            )
        context_dim = dim if context_dim is None else context_dim
        self.heavy_heads, self.num_routed_kv = heavy_heads, num_routed_kv
        self.heads_per_set = heavy_heads // num_routed_kv
        self.multiply_keys_by_score = multiply_keys_by_score
        self.multiply_queries_by_score = multiply_queries_by_score
        self.dropout = dropout

        heavy_inner = heavy_heads * heavy_dim_head
        self.heavy_q_proj = nn.Linear(dim, heavy_inner, bias=False)
        self.heavy_k_proj = nn.Linear(context_dim, heavy_inner, bias=False)
        self.heavy_v_proj = nn.Linear(context_dim, heavy_inner, bias=False)
        self.heavy_o_proj = nn.Linear(heavy_inner, dim, bias=False)
        self.heavy_rotary = None if rotary_theta is None else RotaryEmbedding(heavy_dim_head, rotary_theta, rotary_axes)
        self.unrouted_output = nn.Parameter(torch.zeros(dim)) if learned_unrouted_output else None

    def _unrouted(self, routed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | float:
        """The learned heavy output of the tokens not routed (`routed` `(batch, n)` bool), or 0 without one."""
        if self.unrouted_output is None:
            return 0.0
        return (~routed).unsqueeze(-1) * self.unrouted_output.to(dtype)

    def _project_routed_kv(self, tokens: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        """`(batch, sets, k, context_dim)` tokens -> `(batch, heavy_heads, k, head_dim)`: each set only through its
        heads."""
        weight = proj.weight.view(self.num_routed_kv, -1, proj.in_features)
        out = torch.einsum("bsnd,sed->bsne", tokens, weight.to(tokens.dtype))
        return rearrange(out, "b s n (h e) -> b (s h) n e", h=self.heads_per_set)

    def _routed_heavy(
        self,
        x: torch.Tensor,
        routed_q: RouterOutput,
        context: torch.Tensor,
        routed_kv: RouterOutput,
        context_padded: bool,
        q_positions: torch.Tensor | None = None,
        kv_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The heavy output of every token of `x`.

        Args:
            x: `(batch, n, dim)` the queries' tokens.
            routed_q: the routed queries, `(batch, 1, kq)`.
            context: `(batch, m, context_dim)` the tokens keys/values are routed from (x itself in self-attention).
            routed_kv: the routed keys/values, `(batch, num_routed_kv, kv)`.
            context_padded: whether the context had a padding mask (some slots of `routed_kv` may be empty).
            q_positions, kv_positions: rotary positions of x's and the context's tokens, `(batch, n)` or
                `(batch, n, axes)`; None without rotary embeddings.

        Returns:
            `(batch, n, dim)`: attention output times the router weight at routed queries, the learned unrouted
            output (or 0) elsewhere.
        """
        batch, length, _ = x.shape
        heads_per_set = self.heads_per_set
        q_indices, q_weights = routed_q.indices[:, 0], routed_q.weights[:, 0].to(x.dtype)
        kv_weights = routed_kv.weights.to(context.dtype).repeat_interleave(heads_per_set, dim=1).unsqueeze(-1)

        q = self.heavy_q_proj(gather_tokens(x, routed_q.indices)[:, 0])
        q = rearrange(q, "b n (h e) -> b h n e", h=self.heavy_heads)
        kv_tokens = gather_tokens(context, routed_kv.indices)
        k = self._project_routed_kv(kv_tokens, self.heavy_k_proj)
        v = self._project_routed_kv(kv_tokens, self.heavy_v_proj) * kv_weights
        if self.multiply_keys_by_score:
            k = k * kv_weights
        if self.multiply_queries_by_score:
            q = q * q_weights[:, None, :, None]
        if self.heavy_rotary is not None:
            cos_q, sin_q = self.heavy_rotary(positions_at(q_positions, routed_q.indices), q.dtype)
            kv_at = positions_at(kv_positions, routed_kv.indices).repeat_interleave(heads_per_set, dim=1)
            cos_k, sin_k = self.heavy_rotary(kv_at, k.dtype)
            q, k = apply_rotary(q, cos_q, sin_q), apply_rotary(k, cos_k, sin_k)

        if context_padded:
            # A sample with no valid key (a fully padded context) attends to its empty slots instead of producing
            # NaN: their weights are 0, so their values are 0 and so is the sample's heavy output.
            kv_mask = routed_kv.mask | ~routed_kv.mask.any(-1, keepdim=True)
            kv_mask = kv_mask.repeat_interleave(heads_per_set, dim=1).unsqueeze(2)
        else:
            kv_mask = None  # every slot is filled: no mask lets SDPA use its flash kernel
        out = masked_sdpa(q, k, v, kv_mask, self.dropout if self.training else 0.0)
        out = self.heavy_o_proj(rearrange(out, "b h n e -> b n (h e)")) * q_weights.unsqueeze(-1)
        heavy = scatter_tokens(out, q_indices, length)
        if self.unrouted_output is not None:
            # Accumulate: empty slots also point at position 0, and a plain scatter would let them overwrite it.
            hits = torch.zeros(batch, length, dtype=torch.long, device=x.device)
            routed = hits.scatter_add(1, q_indices, routed_q.mask[:, 0].long()) > 0
            heavy = heavy + self._unrouted(routed, x.dtype)
        return heavy


class TwoBranchAttention(RoutedAttentionBase):
    """What the encoder and causal routed attention over sequences share: the light branch (local attention, few
    heads) and the heavy branch's projections, rotary embeddings from absolute positions. Subclasses add routers.
    """

    def __init__(
        self,
        dim: int,
        *,
        causal: bool,
        light_heads: int,
        light_dim_head: int,
        light_window_size: int,
        heavy_heads: int,
        heavy_dim_head: int,
        num_routed_kv: int,
        multiply_keys_by_score: bool,
        multiply_queries_by_score: bool,
        learned_unrouted_output: bool,
        rotary_theta: float,
        dropout: float,
    ):
        super().__init__(
            dim,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=rotary_theta,
            dropout=dropout,
        )
        self.light_heads = light_heads
        self.light_q_proj, self.light_k_proj, self.light_v_proj, self.light_o_proj = light_projections(
            dim, light_heads, light_dim_head
        )
        self.light_rotary = RotaryEmbedding(light_dim_head, rotary_theta)
        self.light_window_size = light_window_size
        self.causal = causal
        self.local_attention = LocalAttention(
            window_size=light_window_size,
            causal=causal,
            look_backward=1,
            look_forward=0 if causal else 1,
            exact_windowsize=True,
            autopad=True,
            dropout=dropout,
            use_rotary_pos_emb=False,
        )

    def _light_qkv(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Light-branch queries, keys (both rotated) and values, `(batch, light_heads, n, head_dim)` each."""
        q, k, v = (
            rearrange(t, "b n (h e) -> b h n e", h=self.light_heads)
            for t in project(x, self.light_q_proj, self.light_k_proj, self.light_v_proj)
        )
        cos, sin = self.light_rotary(position_ids.unsqueeze(1), q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _local_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The light branch's windowed attention: q, k, v `(batch, light_heads, n, head_dim)`, mask `(batch, n)`
        bool (False = padding) or None."""
        dropout = self.dropout if self.training else 0.0
        if q.is_cuda and dropout == 0.0 and q.shape[-1] >= FLEX_MIN_HEAD_DIM:
            # The local-attention package materialises blocked score matrices through a chain of einsums, masks and
            # softmax; FlexAttention visits the same windows in one fused kernel.
            return flex_sliding_window_attention(q, k, v, mask, self.light_window_size, self.causal)
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        if q.is_cuda:
            return sliding_window_attention(q, k, v, valid, self.light_window_size, self.causal, dropout)
        # Always pass a mask: without one, local-attention lets queries attend to the zero keys it pads the
        # sequence with up to a multiple of the window.
        return self.local_attention(q, k, v, mask=valid)


class ConditionalRoutedAttention(TwoBranchAttention):
    """Routed attention layer (CoLT5 section 3.2).

    Args:
        dim: model width.
        num_heavy_tokens_q: routed queries, int count or float fraction of each sample's valid length.
        num_heavy_tokens_kv: routed keys/values per routing set, same convention.
        light_heads, light_dim_head: light branch heads and head width.
        light_window_size: each token attends to this many tokens on each side in the light branch.
        heavy_heads, heavy_dim_head: heavy branch heads and head width.
        num_routed_kv: key/value routing sets; heavy heads are split evenly among them.
        multiply_keys_by_score: scale routed keys by their router weight too (values always are): with it the
            heavy branch sees `lambda_kv * x_kv` exactly as in the paper.
        multiply_queries_by_score: also scale routed queries by their weight (the output always is).
        learned_unrouted_output: add a learned vector to the heavy output of queries that were not routed.
        rotary_theta: base of the rotary embeddings (absolute positions, both branches).
        dropout: attention-probability dropout in both branches.
        router_kwargs: settings of the `CoordinateDescentRouter`s: soft top-k (fetch_ratio, eps, n_iters,
            eps_schedule, straight_through, backend), `route_block_size` (route evenly over blocks of tokens) and
            `random_routing` (random scores, an ablation control).
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        light_heads: int = 4,
        light_dim_head: int = 64,
        light_window_size: int = 127,
        heavy_heads: int = 8,
        heavy_dim_head: int = 64,
        num_routed_kv: int = 1,
        multiply_keys_by_score: bool = True,
        multiply_queries_by_score: bool = False,
        learned_unrouted_output: bool = False,
        rotary_theta: float = 10000.0,
        dropout: float = 0.0,
        router_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__(
            dim,
            causal=False,
            light_heads=light_heads,
            light_dim_head=light_dim_head,
            light_window_size=light_window_size,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=rotary_theta,
            dropout=dropout,
        )
        validate_amount("num_heavy_tokens_q", num_heavy_tokens_q)
        validate_amount("num_heavy_tokens_kv", num_heavy_tokens_kv)
        self.num_heavy_tokens_q = num_heavy_tokens_q
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        self.q_router = CoordinateDescentRouter(dim, 1, **(router_kwargs or {}))
        self.kv_router = CoordinateDescentRouter(dim, num_routed_kv, **(router_kwargs or {}))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding), `position_ids` `(batch, n)`
        (default 0..n-1) -> `(batch, n, dim)`."""
        batch, length, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        return self._light(x, mask, position_ids) + self._heavy(x, mask, position_ids)

    def _light(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self._light_qkv(x, position_ids)
        out = self._local_attention(q, k, v, mask)
        return self.light_o_proj(rearrange(out, "b h n e -> b n (h e)"))

    def _heavy(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        routed_q = self.q_router(x, self.num_heavy_tokens_q, mask)
        routed_kv = self.kv_router(x, self.num_heavy_tokens_kv, mask)
        return self._routed_heavy(x, routed_q, x, routed_kv, mask is not None, position_ids, position_ids)
