# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5's conditional attention (encoder, non-causal).

    y = A_light(x) + lambda_q * A_heavy(x_q, lambda_kv * x_kv)

Light branch: local attention (every token attends to the `light_window_size` tokens on each side) with few
heads: on GPUs FlexAttention over the window's tiles, elsewhere (and with attention dropout) one SDPA call over
blocked windows (sliding_window.py); both are tested against the local-attention package.
Heavy branch: full attention from routed queries to routed keys/values with more heads; the heavy heads are split
evenly among `num_routed_kv` key/value routing sets. `RoutedAttentionBase` holds the heavy branch that the cross
and image attention (cross_attention.py, image_attention.py) share with this layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .masked_sdpa import masked_sdpa, prepend_null_kv
from .rotary import RotaryEmbedding, apply_rotary
from .router import (
    CoordinateDescentRouter,
    RouterOutput,
    call_amount,
    gather_tokens,
    router_layer_kwargs,
    scatter_tokens,
    validate_amount,
)
from .sliding_window import FLEX_MIN_HEAD_DIM, flex_sliding_window_attention, sliding_window_attention
from .spellings import one_spelling


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
        rotary_theta: rotary base; None for no position information in the heavy branch.
        rotary_axes: position axes (1 for sequences, 2 for images).
        dropout: attention-probability dropout.
        heavy_norm: an RMSNorm before the heavy projections (of the routed queries and of the routed context
            tokens; one norm for both when the context is as wide as x), as colt5-attention places it.
        null_kv: a learned key/value pair per heavy head that every query may attend to (colt5-attention's).
        use_flash_attn: False runs the heavy attention on SDPA's math kernel; True or None let SDPA pick its
            fastest kernel (flash attention where the inputs allow).
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
        heavy_norm: bool = False,
        null_kv: bool = False,
        use_flash_attn: bool | None = None,
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
        self.math_attention = use_flash_attn is False

        heavy_inner = heavy_heads * heavy_dim_head
        self.heavy_norm = nn.RMSNorm(dim) if heavy_norm else None
        self.heavy_context_norm = nn.RMSNorm(context_dim) if heavy_norm and context_dim != dim else None
        self.heavy_null_kv = nn.Parameter(torch.randn(2, heavy_heads, heavy_dim_head)) if null_kv else None
        self.heavy_q_proj = nn.Linear(dim, heavy_inner, bias=False)
        self.heavy_k_proj = nn.Linear(context_dim, heavy_inner, bias=False)
        self.heavy_v_proj = nn.Linear(context_dim, heavy_inner, bias=False)
        self.heavy_o_proj = nn.Linear(heavy_inner, dim, bias=False)
        self.heavy_rotary = None if rotary_theta is None else RotaryEmbedding(heavy_dim_head, rotary_theta, rotary_axes)
        self.unrouted_output = nn.Parameter(torch.zeros(dim)) if learned_unrouted_output else None

    def _heavy_input(self, tokens: torch.Tensor, context: bool = False) -> torch.Tensor:
        """`(..., width)` tokens about to be projected by the heavy branch, normalised where it has a norm."""
        norm = self.heavy_context_norm if context and self.heavy_context_norm is not None else self.heavy_norm
        return tokens if norm is None else norm(tokens)

    def _with_null_kv(
        self, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Prepend the learned null key/value (if any) to `(rows, heavy_heads, slots, head_dim)` keys and values,
        and an always-allowed slot to a `(rows, heads, queries, slots)`-broadcastable mask."""
        return prepend_null_kv(k, v, mask, self.heavy_null_kv)

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

        q = self.heavy_q_proj(self._heavy_input(gather_tokens(x, routed_q.indices)[:, 0]))
        q = rearrange(q, "b n (h e) -> b h n e", h=self.heavy_heads)
        kv_tokens = self._heavy_input(gather_tokens(context, routed_kv.indices), context=True)
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
        k, v, kv_mask = self._with_null_kv(k, v, kv_mask)
        dropout = self.dropout if self.training else 0.0
        out = masked_sdpa(q, k, v, kv_mask, dropout, math_only=self.math_attention)
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

    `light_window_size` here is the number of tokens a token sees on each side (before it, in causal attention).
    `branch_norms` puts a LayerNorm before the light branch and an RMSNorm before the heavy projections, as
    colt5-attention's layers normalise their own input; `light_rotary` and `heavy_rotary` give each branch rotary
    positions (base `rotary_theta`); `has_light_attn=False` leaves the light branch out.
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
        light_rotary: bool = True,
        heavy_rotary: bool = True,
        branch_norms: bool = False,
        null_kv: bool = False,
        use_flash_attn: bool | None = None,
        has_light_attn: bool = True,
    ):
        super().__init__(
            dim,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=learned_unrouted_output,
            rotary_theta=rotary_theta if heavy_rotary else None,
            dropout=dropout,
            heavy_norm=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
        )
        self.light_heads = light_heads
        self.light_window_size = light_window_size
        self.causal = causal
        self.has_light_attn = has_light_attn
        if not has_light_attn:
            return
        self.light_norm = nn.LayerNorm(dim) if branch_norms else None
        self.light_q_proj, self.light_k_proj, self.light_v_proj, self.light_o_proj = light_projections(
            dim, light_heads, light_dim_head
        )
        self.light_rotary = RotaryEmbedding(light_dim_head, rotary_theta) if light_rotary else None

    def _light_qkv(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Light-branch queries, keys (both rotated, if the branch has positions) and values, `(batch, light_heads,
        n, head_dim)` each."""
        if self.light_norm is not None:
            x = self.light_norm(x)
        q, k, v = (
            rearrange(t, "b n (h e) -> b h n e", h=self.light_heads)
            for t in project(x, self.light_q_proj, self.light_k_proj, self.light_v_proj)
        )
        if self.light_rotary is None:
            return q, k, v
        cos, sin = self.light_rotary(position_ids.unsqueeze(1), q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def _local_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The light branch's windowed attention: q, k, v `(batch, light_heads, n, head_dim)`, mask `(batch, n)`
        bool (False = padding) or None."""
        dropout = self.dropout if self.training else 0.0
        if q.is_cuda and dropout == 0.0 and q.shape[-1] >= FLEX_MIN_HEAD_DIM:
            # FlexAttention visits only the tiles of keys within the window, in one fused kernel.
            return flex_sliding_window_attention(q, k, v, mask, self.light_window_size, self.causal)
        # Also on CPUs, in place of the local-attention package: 1.8x faster there (forward+backward at the main
        # job's sizes), and compiled by Inductor on the CPU (torch 2.13) local-attention's code aborted or gave
        # wrong key gradients.
        valid = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device) if mask is None else mask.bool()
        return sliding_window_attention(q, k, v, valid, self.light_window_size, self.causal, dropout)


class ConditionalRoutedAttention(TwoBranchAttention):
    """Routed attention layer (CoLT5 section 3.2).

    Takes colt5-attention's keywords with its defaults, and colt5's own (the second name of a pair below).

    Args:
        dim: model width.
        num_heavy_tokens_q: routed queries, int count or float fraction of each sample's valid length.
        num_heavy_tokens_kv: routed keys/values per routing set, same convention.
        num_routed_kv: key/value routing sets; heavy heads are split evenly among them.
        has_light_attn: whether there is a light branch.
        light_heads, light_dim_head: light branch heads and head width.
        light_window_size: the light branch's window: each token attends to the `light_window_size // 2` tokens on
            each side of it (and itself), as in colt5-attention.
        heavy_heads, heavy_dim_head: heavy branch heads and head width.
        router_straight_through: the routers' weights are 1 in the forward pass (gradient of the soft weight
            backward); also `router_kwargs["straight_through"]`.
        router_kwargs: settings of both `CoordinateDescentRouter`s, in either package's keywords (n_iters, eps,
            eps_init, eps_decay, fetch_k_ratio, route_block_size, cosine_sim_routing, ...; fetch_ratio,
            eps_schedule, backend, random_routing).
        router_type: colt5-attention's (up to 0.5): "coor_descent", the only router here.
        multiply_keys_by_score: scale routed keys by their router weight too (values always are): with it the
            heavy branch sees `lambda_kv * x_kv` exactly as in the paper.
        multiply_queries_by_score: also scale routed queries by their weight (the output always is).
        use_triton: the routers' Triton kernels on CUDA (PyTorch elsewhere) when True, PyTorch when False; default:
            Triton on CUDA.
        use_null_q_tokens, learned_unrouted_output: a learned heavy output for queries that are not routed.
        use_flash_attn: see `RoutedAttentionBase`.
        rotary_emb: rotary positions in the heavy branch; light_rotary_emb: in the light branch (colt5's; the
            light branch of colt5-attention has no positions). Base `rotary_theta`, from `position_ids`.
        branch_norms: each branch normalises its input (LayerNorm before the light branch, RMSNorm before the heavy
            projections; the routers see the input itself), as colt5-attention's layers do. False where a block
            normalises before the layer (CoLT5Config's models).
        null_kv: a learned null key/value per heavy head (colt5-attention's heavy attention has one).
        dropout: attention-probability dropout in both branches.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heavy_tokens_q: int | float,
        num_heavy_tokens_kv: int | float,
        num_routed_kv: int = 1,
        has_light_attn: bool = True,
        light_dim_head: int = 64,
        light_heads: int = 8,
        light_window_size: int = 128,
        heavy_dim_head: int = 64,
        heavy_heads: int = 8,
        router_straight_through: bool | None = None,
        router_kwargs: dict[str, Any] | None = None,
        router_type: str = "coor_descent",
        multiply_keys_by_score: bool = False,
        multiply_queries_by_score: bool = False,
        use_triton: bool | None = None,
        use_null_q_tokens: bool | None = None,
        use_flash_attn: bool | None = None,
        rotary_emb: bool = False,
        learned_unrouted_output: bool | None = None,
        light_rotary_emb: bool = True,
        rotary_theta: float = 10000.0,
        branch_norms: bool = True,
        null_kv: bool = False,
        dropout: float = 0.0,
    ):
        window_ok = isinstance(light_window_size, int) and not isinstance(light_window_size, bool) and light_window_size >= 2
        if has_light_attn and not window_ok:
            raise ValueError(
                f"light_window_size must be an int >= 2 (the window: light_window_size // 2 tokens on each side), "
                f"got {light_window_size!r}."
            )
        super().__init__(
            dim,
            causal=False,
            light_heads=light_heads,
            light_dim_head=light_dim_head,
            light_window_size=light_window_size // 2,
            heavy_heads=heavy_heads,
            heavy_dim_head=heavy_dim_head,
            num_routed_kv=num_routed_kv,
            multiply_keys_by_score=multiply_keys_by_score,
            multiply_queries_by_score=multiply_queries_by_score,
            learned_unrouted_output=one_spelling(
                True, use_null_q_tokens=use_null_q_tokens, learned_unrouted_output=learned_unrouted_output
            ),
            rotary_theta=rotary_theta,
            dropout=dropout,
            light_rotary=light_rotary_emb,
            heavy_rotary=rotary_emb,
            branch_norms=branch_norms,
            null_kv=null_kv,
            use_flash_attn=use_flash_attn,
            has_light_attn=has_light_attn,
        )
        validate_amount("num_heavy_tokens_q", num_heavy_tokens_q)
        validate_amount("num_heavy_tokens_kv", num_heavy_tokens_kv)
        self.num_heavy_tokens_q = num_heavy_tokens_q
        self.num_heavy_tokens_kv = num_heavy_tokens_kv
        router = router_layer_kwargs(router_kwargs, router_straight_through, use_triton, router_type)
        self.q_router = CoordinateDescentRouter(dim, num_sets=1, **router)
        self.kv_router = CoordinateDescentRouter(dim, num_sets=num_routed_kv, **router)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        num_heavy_tokens_q: int | float | None = None,
        num_heavy_tokens_kv: int | float | None = None,
    ) -> torch.Tensor:
        """`x` `(batch, n, dim)`, `mask` `(batch, n)` bool (False = padding), `position_ids` `(batch, n)`
        (default 0..n-1) -> `(batch, n, dim)`. `num_heavy_tokens_q` / `_kv` override the layer's amounts for
        this call."""
        batch, length, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=x.device).expand(batch, length)
        amount_q = call_amount("num_heavy_tokens_q", num_heavy_tokens_q, self.num_heavy_tokens_q)
        amount_kv = call_amount("num_heavy_tokens_kv", num_heavy_tokens_kv, self.num_heavy_tokens_kv)
        # The light branch first: with attention dropout, the order fixes which random numbers each branch draws.
        light = self._light(x, mask, position_ids) if self.has_light_attn else 0.0
        return light + self._heavy(x, mask, position_ids, amount_q, amount_kv)

    def _light(self, x: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor) -> torch.Tensor:
        q, k, v = self._light_qkv(x, position_ids)
        out = self._local_attention(q, k, v, mask)
        return self.light_o_proj(rearrange(out, "b h n e -> b n (h e)"))

    def _heavy(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        amount_q: int | float,
        amount_kv: int | float,
    ) -> torch.Tensor:
        """The heavy branch, routing `amount_q` queries and `amount_kv` keys/values per set."""
        routed_q = self.q_router(x, amount_q, mask)
        routed_kv = self.kv_router(x, amount_kv, mask)
        return self._routed_heavy(x, routed_q, x, routed_kv, mask is not None, position_ids, position_ids)
