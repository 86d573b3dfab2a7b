# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""Trained colt5-attention modules as colt5 layers: `from_colt5_attention(module)`.

The colt5 layer is built with the reference's settings and architecture (its norms inside each branch, biased GELU
MLPs, a null key/value in the heavy attention, no positions in the light branch) and gets its weights. The
reference package is not imported: its modules are read by their attribute names (colt5-attention 0.11.2).

Where both compute the same function (feedforward, encoder attention and block), outputs agree with the
reference's (tests/test_convert_colt5_attention.py gives the tolerances). The image attention, the autoregressive
attention and the ViT get the same weights, but route differently (README, "Migrating from colt5-attention").
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from .autoregressive_attention import ConditionalRoutedAutoregressiveAttention
from .cross_attention import ConditionalRoutedCrossAttention
from .image_attention import ConditionalRoutedImageAttention
from .routed_attention import ConditionalRoutedAttention
from .routed_block import ConditionalRoutedTransformerBlock
from .routed_feedforward import ConditionalRoutedFeedForward
from .vit import ConditionalRoutedViT

# Reference buffers that are recomputed, not learned: rotary frequencies and the attention's causal-mask cache.
_DERIVED_BUFFERS = ("inv_freq", "attend.mask")


def _router_kwargs(router: nn.Module) -> dict[str, Any]:
    """Our router settings from a reference `CoordinateDescentRouter`."""
    if router.routing_token is None:
        raise ValueError(
            "This colt5-attention router takes its routing tokens at call time (learned_routing_tokens=True); "
            "colt5's routers learn their own and cannot take it over."
        )
    return dict(
        straight_through=router.straight_through,
        n_iters=router.n_iters,
        eps=router.eps,
        eps_init=router.eps_init,
        eps_decay=router.eps_decay,
        fetch_k_ratio=router.fetch_k_ratio,
        route_block_size=router.route_block_size,
        cosine_sim_routing=router.cosine_sim_routing,
        cosine_sim_scale=router.cosine_sim_scale,
        use_triton=isinstance(router.coor_descent, functools.partial),
    )


def _shared_router_kwargs(*routers: nn.Module, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The settings several reference routers of one layer share (colt5's layers give all their routers one)."""
    settings = [{k: v for k, v in _router_kwargs(router).items() if k not in ignore} for router in routers]
    if any(other != settings[0] for other in settings[1:]):
        raise ValueError(f"The layer's routers have different settings ({settings}); colt5 gives them one.")
    return settings[0]


class _WeightMap:
    """Collects `ours name -> reference tensor` and checks, at `load`, that every learned reference tensor went
    somewhere and every learned tensor of ours got one."""

    def __init__(self, reference: nn.Module):
        self.reference = reference.state_dict()
        self.taken: set[str] = set()
        self.ours: dict[str, torch.Tensor] = {}

    def take(self, ours: str, reference: str) -> None:
        self.put(ours, self.pull(reference))

    def pull(self, reference: str) -> torch.Tensor:
        self.taken.add(reference)
        return self.reference[reference]

    def put(self, ours: str, tensor: torch.Tensor) -> None:
        self.ours[ours] = tensor

    def load(self, layer: nn.Module, own: tuple[str, ...] = ()) -> nn.Module:
        left = [name for name in self.reference if name not in self.taken and not name.endswith(_DERIVED_BUFFERS)]
        if left:
            raise ValueError(f"colt5 has no place for these colt5-attention weights: {left}.")
        state = layer.state_dict()
        missing = [name for name in state if name not in self.ours and not name.endswith(own)]
        if missing:
            raise ValueError(f"No colt5-attention weights for {missing}.")
        for name, tensor in self.ours.items():
            if state[name].shape != tensor.shape:
                raise ValueError(
                    f"{name}: colt5-attention's has shape {tuple(tensor.shape)}, ours {tuple(state[name].shape)}."
                )
        state.update(self.ours)
        layer.load_state_dict(state)
        return layer


def _map_feedforward(weights: _WeightMap, ours: str, ref: str) -> None:
    weights.take(f"{ours}router.routing_vectors", f"{ref}router.routing_token")
    for branch in ("light", "heavy"):
        weights.take(f"{ours}{branch}_norm.weight", f"{ref}{branch}_ff.0.gamma")
        for our_name, index in (("up_proj", 1), ("down_proj", 3)):
            for kind in ("weight", "bias"):
                weights.take(f"{ours}{branch}_mlp.{our_name}.{kind}", f"{ref}{branch}_ff.{index}.{kind}")


def _map_heavy(weights: _WeightMap, ours: str, ref: str, query_router: bool = True) -> None:
    """The heavy `Attention` (norm, null key/value, projections), the unrouted-query output and the routers
    (without `query_router` ours has neither a query router nor an unrouted-query output, since every token is a
    heavy query: the reference's query routing vector and null query token, unused then, are dropped)."""
    weights.take(f"{ours}heavy_norm.weight", f"{ref}heavy_attn.norm.gamma")
    weights.take(f"{ours}heavy_null_kv", f"{ref}heavy_attn.null_kv")
    weights.take(f"{ours}heavy_q_proj.weight", f"{ref}heavy_attn.to_q.weight")
    weights.take(f"{ours}heavy_o_proj.weight", f"{ref}heavy_attn.to_out.weight")
    # to_kv rows are (set, head, [key features, value features]): each head's key and value sit side by side.
    to_kv = weights.pull(f"{ref}heavy_attn.to_kv.weight")
    dim_head = weights.reference[f"{ref}heavy_attn.null_kv"].shape[-1]
    pairs = to_kv.view(-1, 2, dim_head, to_kv.shape[-1])
    weights.put(f"{ours}heavy_k_proj.weight", pairs[:, 0].reshape(-1, to_kv.shape[-1]))
    weights.put(f"{ours}heavy_v_proj.weight", pairs[:, 1].reshape(-1, to_kv.shape[-1]))
    null_query = f"{ref}null_q_token" in weights.reference
    if query_router:
        if null_query:
            weights.take(f"{ours}unrouted_output", f"{ref}null_q_token")
        weights.take(f"{ours}q_router.routing_vectors", f"{ref}q_router.routing_token")
    else:
        weights.pull(f"{ref}q_router.routing_token")
        if null_query:
            weights.pull(f"{ref}null_q_token")
    weights.take(f"{ours}kv_router.routing_vectors", f"{ref}kv_router.routing_token")


def _map_light(weights: _WeightMap, ours: str, ref: str, norm: str) -> None:
    """A light branch of one `to_qkv` (queries, keys, values stacked) and `to_out`, after a LayerNorm or RMSNorm."""
    if norm == "layer":
        weights.take(f"{ours}light_norm.weight", f"{ref}light_attn.norm.weight")
        weights.take(f"{ours}light_norm.bias", f"{ref}light_attn.norm.bias")
    else:
        weights.take(f"{ours}light_norm.weight", f"{ref}light_attn.norm.gamma")
    for name, weight in zip(("q", "k", "v"), weights.pull(f"{ref}light_attn.to_qkv.weight").chunk(3)):
        weights.put(f"{ours}light_{name}_proj.weight", weight)
    weights.take(f"{ours}light_o_proj.weight", f"{ref}light_attn.to_out.weight")


def _heavy_kwargs(module: nn.Module) -> dict[str, Any]:
    heavy = module.heavy_attn
    return dict(
        heavy_heads=heavy.heads,
        heavy_dim_head=heavy.null_kv.shape[-1],
        multiply_keys_by_score=heavy.multiply_keys_by_score,
        use_null_q_tokens=module.null_q_token is not None,
        use_flash_attn=heavy.attend.use_flash,
        null_kv=True,
        branch_norms=True,
    )


def _light_kwargs(light: nn.Module) -> dict[str, Any]:
    return dict(light_heads=light.heads, light_dim_head=light.to_qkv.out_features // 3 // light.heads)


def _attention(module: nn.Module, weights: _WeightMap, ours: str = "", ref: str = "") -> dict[str, Any]:
    light = module.light_attn
    kwargs = dict(
        num_heavy_tokens_q=module.num_heavy_tokens_q,
        num_heavy_tokens_kv=module.num_heavy_tokens_kv,
        num_routed_kv=module.kv_router.num_routing_tokens,
        has_light_attn=light is not None,
        multiply_queries_by_score=module.multiply_queries_by_score,
        rotary_emb=module.rotary_emb is not None,
        light_rotary_emb=False,
        router_kwargs=_shared_router_kwargs(module.q_router, module.kv_router),
        **_heavy_kwargs(module),
    )
    if light is not None:
        # LocalMHA's window is the look-around bucket: light_window_size // 2 tokens on each side.
        kwargs.update(_light_kwargs(light), light_window_size=2 * light.window_size)
        _map_light(weights, ours, ref, norm="layer")
    _map_heavy(weights, ours, ref)
    return kwargs


def _feedforward_kwargs(module: nn.Module) -> dict[str, Any]:
    return dict(
        num_heavy_tokens=module.num_heavy_tokens,
        light_hidden_dim=module.light_ff[1].out_features,
        heavy_hidden_dim=module.heavy_ff[1].out_features,
        mlp="gelu",
        router_kwargs=_router_kwargs(module.router),
    )


def _image_kwargs(module: nn.Module, weights: _WeightMap, ours: str = "", ref: str = "") -> dict[str, Any]:
    _map_light(weights, ours, ref, norm="rms")
    _map_heavy(weights, ours, ref)
    return dict(
        num_heavy_tokens_q=module.num_heavy_tokens_q,
        num_heavy_tokens_kv=module.num_heavy_tokens_kv,
        num_routed_kv=module.kv_router.num_routing_tokens,
        light_window_size=module.light_window_size,
        channel_first=module.channel_first,
        multiply_queries_by_score=module.multiply_queries_by_score,
        rotary_theta=None,
        router_kwargs=_shared_router_kwargs(module.q_router, module.kv_router),
        **_light_kwargs(module.light_attn),
        **_heavy_kwargs(module),
    )


def from_colt5_attention(module: nn.Module, **kwargs: Any) -> nn.Module:
    """The colt5 layer matching a (trained) colt5-attention module, with its weights.

    Args:
        module: a colt5-attention 0.11.2 `ConditionalRoutedFeedForward`, `ConditionalRoutedAttention`,
            `ConditionalRoutedTransformerBlock`, `ConditionalRoutedCrossAttention`, `ConditionalRoutedImageAttention`,
            `ConditionalRoutedAutoregressiveAttention` or `ConditionalRoutedViT`.
        **kwargs: constructor settings that override the ones read from the module (the ViT needs `image_size`,
            which colt5-attention does not keep).

    Returns:
        The colt5 layer of the same name, in float32 on the CPU, in the module's training mode.
    """
    kind = type(module).__name__
    if not type(module).__module__.startswith("colt5_attention"):
        raise TypeError(f"Expected a module of the colt5-attention package, got {type(module).__module__}.{kind}.")
    weights = _WeightMap(module)
    own: tuple[str, ...] = ()
    if kind == "ConditionalRoutedFeedForward":
        dim = module.router.routing_token.shape[-1]
        layer_class, settings = ConditionalRoutedFeedForward, _feedforward_kwargs(module)
        _map_feedforward(weights, "", "")
    elif kind == "ConditionalRoutedAttention":
        dim = module.q_router.routing_token.shape[-1]
        layer_class, settings = ConditionalRoutedAttention, _attention(module, weights)
    elif kind == "ConditionalRoutedTransformerBlock":
        dim = module.conditional_attn.q_router.routing_token.shape[-1]
        attention = _attention(module.conditional_attn, weights, "attention.", "conditional_attn.")
        feedforward = _feedforward_kwargs(module.conditional_ff)
        _map_feedforward(weights, "feedforward.", "conditional_ff.")
        if feedforward.pop("router_kwargs") != attention["router_kwargs"]:
            raise ValueError(
                "The block's feedforward and attention routers have different settings; colt5 gives them one."
            )
        layer_class = ConditionalRoutedTransformerBlock
        settings = dict(
            num_heavy_attn_tokens_q=attention.pop("num_heavy_tokens_q"),
            num_heavy_attn_tokens_kv=attention.pop("num_heavy_tokens_kv"),
            num_heavy_ff_tokens=feedforward.pop("num_heavy_tokens"),
            light_ff_hidden_dim=feedforward.pop("light_hidden_dim"),
            heavy_ff_hidden_dim=feedforward.pop("heavy_hidden_dim"),
            **feedforward,
            **attention,
        )
    elif kind == "ConditionalRoutedCrossAttention":
        dim = module.q_router.routing_token.shape[-1]
        layer_class = ConditionalRoutedCrossAttention
        _map_heavy(weights, "", "")
        heavy = _heavy_kwargs(module)
        settings = dict(
            num_tokens_q=module.num_tokens_q,
            num_tokens_kv=module.num_tokens_kv,
            kv_routing_tokens=module.kv_router.num_routing_tokens,
            heads=heavy.pop("heavy_heads"),
            dim_head=heavy.pop("heavy_dim_head"),
            route_block_size=module.kv_router.route_block_size,
            router_kwargs=_shared_router_kwargs(module.q_router, module.kv_router, ignore=("route_block_size",)),
            **heavy,
        )
    elif kind == "ConditionalRoutedImageAttention":
        dim = module.q_router.routing_token.shape[-1]
        layer_class, settings = ConditionalRoutedImageAttention, _image_kwargs(module, weights)
    elif kind == "ConditionalRoutedAutoregressiveAttention":
        dim = module.q_router.routing_token.shape[-1]
        layer_class = ConditionalRoutedAutoregressiveAttention
        _map_light(weights, "", "", norm="layer")
        _map_heavy(weights, "", "", query_router=module.num_heavy_tokens_q < module.heavy_window_size)
        settings = dict(
            num_heavy_tokens_q=module.num_heavy_tokens_q,
            num_heavy_tokens_kv=module.num_heavy_tokens_kv,
            num_routed_kv=module.kv_router.num_routing_tokens,
            light_window_size=module.light_attn.window_size,
            heavy_window_size=module.heavy_window_size,
            multiply_queries_by_score=module.multiply_queries_by_score,
            rotary_emb=module.rotary_emb is not None,
            light_rotary_emb=False,
            router_kwargs=_shared_router_kwargs(module.q_router, module.kv_router),
            **_light_kwargs(module.light_attn),
            **_heavy_kwargs(module),
        )
        # The per-token router's running statistics (and, with prefix normalization, the prior of its prefix
        # statistics) have no counterpart: the layer keeps its initial ones.
        own = ("q_router.threshold", "q_router.shift", "q_router.score_mean", "q_router.score_var", "q_router.updates")
    elif kind == "ConditionalRoutedViT":
        return _vit(module, weights, kwargs)
    else:
        raise TypeError(f"from_colt5_attention does not know colt5-attention's {kind}.")
    layer = layer_class(dim, **{**settings, **kwargs})
    return weights.load(layer, own).train(module.training)


def _vit(module: nn.Module, weights: _WeightMap, kwargs: dict[str, Any]) -> ConditionalRoutedViT:
    if "image_size" not in kwargs:
        raise ValueError("Pass image_size=...: colt5-attention's ConditionalRoutedViT does not keep its image size.")
    embedding, head = module.to_patch_embedding, module.linear_head
    patch = embedding[0].axes_lengths
    first_attention, first_feedforward = module.transformer.layers[0]
    for ours, index in (("patch_norm", 1), ("patch_proj", 2), ("embedding_norm", 3)):
        for kind in ("weight", "bias"):
            weights.take(f"{ours}.{kind}", f"to_patch_embedding.{index}.{kind}")
    for ours, index in (("head_norm", 1), ("head", 2)):
        for kind in ("weight", "bias"):
            weights.take(f"{ours}.{kind}", f"linear_head.{index}.{kind}")
    for depth, (attention, feedforward) in enumerate(module.transformer.layers):
        image = _image_kwargs(attention, weights, f"layers.{depth}.0.", f"transformer.layers.{depth}.0.")
        _map_feedforward(weights, f"layers.{depth}.1.", f"transformer.layers.{depth}.1.")
    router = _router_kwargs(first_attention.q_router)
    settings = dict(
        patch_size=(patch["p1"], patch["p2"]),
        num_classes=head[2].out_features,
        dim=embedding[2].out_features,
        depth=len(module.transformer.layers),
        attn_num_heavy_tokens_q=image["num_heavy_tokens_q"],
        attn_num_heavy_tokens_kv=image["num_heavy_tokens_kv"],
        attn_heavy_dim_head=image["heavy_dim_head"],
        attn_heavy_heads=image["heavy_heads"],
        attn_light_dim_head=image["light_dim_head"],
        attn_light_heads=image["light_heads"],
        attn_light_window_size=image["light_window_size"],
        attn_num_routed_kv=image["num_routed_kv"],
        ff_num_heavy_tokens=first_feedforward.num_heavy_tokens,
        ff_heavy_mult=first_feedforward.heavy_ff[1].out_features / embedding[2].out_features,
        ff_light_mult=first_feedforward.light_ff[1].out_features / embedding[2].out_features,
        channels=embedding[1].normalized_shape[0] // (patch["p1"] * patch["p2"]),
        router_straight_through=router.pop("straight_through"),
        router_use_triton=router.pop("use_triton"),
        router_kwargs=router,
        flash_attn=image["use_flash_attn"],
        mlp="gelu",
        rotary_theta=None,
        null_kv=True,
    )
    return weights.load(ConditionalRoutedViT(**{**settings, **kwargs})).train(module.training)
