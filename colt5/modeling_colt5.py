# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 models for transformers: the backbone (encoder, or causal with `config.is_causal`), a causal language
model head with cached generation, a long-document classification head, and the paper's encoder-decoder (the routed
encoder with a dense decoder whose cross attention is multi-query)."""


import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutput,
    BaseModelOutputWithPast,
    BaseModelOutputWithPastAndCrossAttentions,
    CausalLMOutputWithPast,
    Seq2SeqLMOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple, logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_colt5 import CACHE_NAME, CoLT5Cache, accepts_past_key_values
from .cuda_graph_decoding import CudaGraphDecodeStep
from .causal_attention import CausalRoutedAttention
from .causal_router import ThresholdRouter
from .configuration_colt5 import CoLT5Config
from .masked_sdpa import masked_sdpa
from .rotary import RotaryEmbedding, apply_rotary
from .routed_attention import ConditionalRoutedAttention
from .routed_block import CausalRoutedTransformerBlock, ConditionalRoutedTransformerBlock
from .routed_feedforward import GatedMLP
from .router import TokenScorer

logger = logging.get_logger(__name__)


def _block_kwargs(config: CoLT5Config) -> dict:
    """The block settings the encoder and causal layers share."""
    return dict(
        light_ff_hidden_dim=config.light_intermediate_size,
        heavy_ff_hidden_dim=config.heavy_intermediate_size,
        activation=ACT2FN[config.hidden_act],
        norm_eps=config.rms_norm_eps,
        dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout,
        light_heads=config.light_num_heads,
        light_dim_head=config.light_head_dim,
        heavy_heads=config.heavy_num_heads,
        heavy_dim_head=config.heavy_head_dim,
        num_routed_kv=config.num_kv_routing_sets,
        multiply_keys_by_score=config.multiply_keys_by_score,
        multiply_queries_by_score=config.multiply_queries_by_score,
        learned_unrouted_output=config.learned_unrouted_query_output,
        rotary_theta=config.rope_theta,
    )


class CoLT5Layer(ConditionalRoutedTransformerBlock, GradientCheckpointingLayer):
    """One CoLT5 encoder block built from the config (gradient checkpointing comes from
    `GradientCheckpointingLayer`)."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__(
            config.hidden_size,
            num_heavy_tokens_q=config.routed_query_tokens,
            num_heavy_tokens_kv=config.routed_kv_tokens,
            num_heavy_ff_tokens=config.routed_ff_tokens,
            router_kwargs=config.router_kwargs(),
            # The layer's window is the whole window, light_window_size // 2 tokens on each side (colt5-attention's
            # meaning); the config's light_window_size counts the tokens on each side.
            light_window_size=2 * config.light_window_size,
            rotary_emb=True,
            branch_norms=False,
            **_block_kwargs(config),
        )
        self.layer_idx = layer_idx


class CoLT5CausalLayer(CausalRoutedTransformerBlock, GradientCheckpointingLayer):
    """One CoLT5 causal block built from the config: its output at position t depends on tokens <= t only."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__(
            config.hidden_size,
            routed_query_fraction=config.routed_query_tokens,
            routed_ff_fraction=config.routed_ff_tokens,
            memory_size=config.routed_memory_size(),
            block_size=config.causal_block_size,
            router_kwargs={k: v for k, v in config.router_kwargs().items() if k != "route_block_size"},
            router_prefix_normalization=config.causal_router_prefix_normalization,
            router_momentum=config.causal_router_momentum,
            router_capacity_factor=config.causal_router_capacity_factor,
            router_capacity_burst=config.causal_router_capacity_burst,
            light_window_size=config.light_window_size,
            layer_idx=layer_idx,
            **_block_kwargs(config),
        )
        self.layer_idx = layer_idx


@auto_docstring
class CoLT5PreTrainedModel(PreTrainedModel):
    config: CoLT5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    # Set per instance by CoLT5Model (CoLT5Layer or CoLT5CausalLayer): FSDP's auto-wrap policy rejects a name that
    # matches no module of the model.
    _no_split_modules = None
    _can_record_outputs = {"hidden_states": [CoLT5Layer, CoLT5CausalLayer]}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, TokenScorer):
            # Unit-norm-scale routing vectors: scores of RMS-normalised tokens start with unit spread, the scale
            # the soft top-k's eps = 1 is meant for.
            init.normal_(module.routing_vectors, std=module.routing_vectors.shape[-1] ** -0.5)
        if isinstance(module, ThresholdRouter):
            threshold, shift = module.reference_statistics()
            init.constant_(module.threshold, threshold)
            init.constant_(module.shift, shift)
            if module.prefix_normalization:
                init.zeros_(module.score_mean)
                init.ones_(module.score_var)
                init.zeros_(module.updates)
        if isinstance(module, (ConditionalRoutedAttention, CausalRoutedAttention)) and module.unrouted_output is not None:
            init.zeros_(module.unrouted_output)


def _check_new_tokens_valid(mask: torch.Tensor) -> None:
    """Refuse padding among tokens appended to a filled cache (`mask` `(batch, new)`, the new tokens' columns).
    Reads the mask on the host: one device synchronisation."""
    if not bool(mask.all()):
        raise ValueError(
            "With a cache, new tokens must all be valid (attention_mask 1): CoLT5 takes padding in the first "
            "forward pass (the prompt) only."
        )


def _validate_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int = 0,
    prefix: str = "",
) -> None:
    """Checks a stack's inputs; `prefix` is how the caller names them (the decoder's are `decoder_input_ids`, ...)."""
    ids, embeds, mask = f"{prefix}input_ids", f"{prefix}inputs_embeds", f"{prefix}attention_mask"
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"Pass exactly one of {ids} or {embeds}.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"{ids} must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"{embeds} must be (batch, sequence, hidden), got shape {tuple(inputs_embeds.shape)}.")
    batch, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
        cached = f" (the {past_length} cached tokens and the {length} new ones)" if past_length else ""
        raise ValueError(
            f"{mask} must have shape (batch, sequence) = {(batch, past_length + length)}{cached}, "
            f"got {tuple(attention_mask.shape)}: pass the tokenizer's 2-D padding mask (1 = token, 0 = padding)."
        )


def _expand_position_ids(
    position_ids: torch.Tensor, batch: int, length: int, name: str = "position_ids"
) -> torch.Tensor:
    """Given positions of shape `(length,)`, `(1, length)` or `(batch, length)` as `(batch, length)`."""
    if position_ids.shape not in ((length,), (1, length), (batch, length)):
        raise ValueError(
            f"{name} must have shape (sequence,), (1, sequence) or (batch, sequence) = {(batch, length)}, got "
            f"{tuple(position_ids.shape)}."
        )
    return position_ids.expand(batch, length)


@auto_docstring
class CoLT5Model(CoLT5PreTrainedModel):
    def __init__(self, config: CoLT5Config):
        super().__init__(config)
        layer_class = CoLT5CausalLayer if config.is_causal else CoLT5Layer
        self._no_split_modules = [layer_class.__name__]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([layer_class(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CoLT5Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for tokens, 0 for padding. Padding is never routed while a sample has valid tokens left, never
            attended to, and the routed amounts (fractions) follow each sample's own valid length. With a cache
            the mask covers the cached tokens and the new ones, and the new ones must all be 1.
        cache (`CoLT5Cache`, *optional*):
            Causal models only: the state of the previous tokens, updated in place (`use_cache=True` creates one).
            Also taken as `past_key_values`, its name before transformers 5.24.
        """
        causal = self.config.is_causal
        if not causal and cache is not None:
            raise ValueError("A cache needs a causal model (config.is_causal=True); this one is an encoder.")
        if cache is not None and not isinstance(cache, CoLT5Cache):
            raise ValueError(
                f"CoLT5 needs its own cache, got {type(cache).__name__}: pass a CoLT5Cache(config) or "
                "use_cache=True (generate() does this)."
            )
        # The cached length matters only to check and slice an attention mask (so a compiled decode step, which
        # passes none, does not specialise on the growing length).
        past_length = cache.get_seq_length() if cache is not None and attention_mask is not None else 0
        _validate_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        mask = attention_mask[:, past_length:].bool() if attention_mask is not None else None
        if causal and use_cache and cache is None:
            cache = CoLT5Cache(self.config)
        if past_length > 0 and mask is not None:
            _check_new_tokens_valid(mask)
            mask = None
        position_ids = self._position_ids(position_ids, mask, batch, length, inputs_embeds.device, cache)

        hidden_states = inputs_embeds
        for layer in self.layers:
            if causal:
                hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache)
            else:
                hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})

    def _position_ids(
        self,
        position_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
        cache: CoLT5Cache | None,
    ) -> torch.Tensor:
        """`(batch, length)` rotary positions: the given ones broadcast, else 0..n-1 for the encoder and the valid
        index (padding does not count, cached tokens do) for the causal model."""
        if position_ids is not None:
            return _expand_position_ids(position_ids, batch, length)
        if not self.config.is_causal:
            return torch.arange(length, device=device).expand(batch, length)
        if mask is None:
            position_ids = torch.arange(length, device=device).expand(batch, length)
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        if cache is not None and cache.get_seq_length() > 0:
            position_ids = position_ids + cache.device_counts().unsqueeze(-1)
        return position_ids


@auto_docstring(custom_intro="CoLT5 causal language model: the causal backbone with a (tied) language-model head.")
class CoLT5ForCausalLM(CoLT5PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: CoLT5Config):
        if not config.is_causal:
            raise ValueError(
                "CoLT5ForCausalLM needs a causal config: set is_causal=True (an encoder config routes over the whole "
                "sequence, so its outputs would see later tokens)."
            )
        super().__init__(config)
        self.model = CoLT5Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # generate() must not build a DynamicCache: the first forward pass creates a CoLT5Cache and returns it.
        return False

    @accepts_past_key_values
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: CoLT5Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast:
        r"""
        cache (`CoLT5Cache`, *optional*):
            The state of the previous tokens, updated in place (`use_cache=True` creates one). Also taken as
            `past_key_values`, its name before transformers 5.24.
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token targets aligned with `input_ids` (the loss shifts them); -100 is ignored.
        """
        if self._decodes_with_cuda_graph(input_ids, inputs_embeds, cache, labels, logits_to_keep, kwargs):
            return CausalLMOutputWithPast(
                logits=self._graph_decode_step(input_ids, attention_mask, position_ids, cache), **{CACHE_NAME: cache}
            )
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{CACHE_NAME: outputs.get(CACHE_NAME)},
        )

    def _decodes_with_cuda_graph(self, input_ids, inputs_embeds, cache, labels, logits_to_keep, kwargs) -> bool:
        """Whether this call is a one-token decode step a CUDA graph can replay (see cuda_graph_decoding.py): on a
        GPU, in evaluation without gradients, from token ids, into a filled cache, asking for logits only."""
        return (
            self.config.cuda_graph_decoding
            and isinstance(cache, CoLT5Cache)
            and cache.get_seq_length() > 0
            and input_ids is not None
            and inputs_embeds is None
            and input_ids.is_cuda
            and input_ids.shape[1] == 1
            and not self.training
            and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and labels is None
            and isinstance(logits_to_keep, int)
            # None means the config's setting; either one asking for them keeps the step eager.
            and not (kwargs.get("output_hidden_states") or self.config.output_hidden_states)
            and not (kwargs.get("output_attentions") or self.config.output_attentions)
        )

    def _graph_decode_step(self, input_ids, attention_mask, position_ids, cache: CoLT5Cache) -> torch.Tensor:
        """`(batch, 1, vocab)` logits of one new token per sample, from the cache's captured decode step."""
        past_length = cache.get_seq_length()
        _validate_inputs(input_ids, None, attention_mask, past_length)
        if attention_mask is not None:
            _check_new_tokens_valid(attention_mask[:, past_length:])
        # A new tensor, not a view of the cache's counts: the step advances those in place.
        position_ids = self.model._position_ids(position_ids, None, input_ids.shape[0], 1, input_ids.device, cache)
        if cache.decode_graph is None:
            cache.decode_graph = CudaGraphDecodeStep()
        return cache.decode_graph(self, cache, input_ids, position_ids)


@auto_docstring(
    custom_intro="CoLT5 encoder with a classification/regression head on the masked mean of its last hidden states."
)
class CoLT5ForSequenceClassification(CoLT5PreTrainedModel):
    def __init__(self, config: CoLT5Config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = CoLT5Model(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SequenceClassifierOutput:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
            Class indices in `[0, config.num_labels)` (cross-entropy), or float targets when
            `config.num_labels == 1` (regression); multi-label with `config.problem_type`.
        """
        outputs = self.model(
            input_ids, attention_mask=attention_mask, position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs
        )
        hidden_states = outputs.last_hidden_state
        if attention_mask is None:
            pooled = hidden_states.mean(dim=1)
        else:
            weights = attention_mask.to(hidden_states.dtype).unsqueeze(-1)
            pooled = (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.score(pooled)
        loss = None
        if labels is not None:
            loss = self.loss_function(labels=labels, pooled_logits=logits, config=self.config)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class CoLT5DecoderSelfAttention(nn.Module):
    """Dense causal self-attention of the decoder, with rotary positions; keys and values go to the cache layer of
    `layer_idx` (transformers' `DynamicCache`). Queries, keys and values come from one projection, and queries and
    keys rotate in one call: a decoding step is bound by the host's kernel launches, not by the GPU."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.decoder_num_heads
        self.head_dim = config.decoder_head_dim
        self.attention_dropout = config.attention_dropout
        inner = self.num_heads * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * inner, bias=False)
        self.o_proj = nn.Linear(inner, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch, length, hidden)`, the new decoder tokens.
            position_embeddings: rotary cos, sin of shape `(batch, length, head_dim)`.
            attention_mask: bool `(batch, 1, length, cached + length)`, True where a token may attend; None: every
                cached and new key (a single new token).
            cache: the self-attention cache; this layer appends its keys/values.
        Returns: `(batch, length, hidden)`.
        """
        batch, length, _ = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(batch, length, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, batch, heads, length, head_dim)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        q, k = apply_rotary(qkv[:2], cos, sin).unbind(0)
        v = qkv[2]
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        out = masked_sdpa(q, k, v, attention_mask, self.attention_dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


# Up to this many scores per call (batch x query rows x keys) the cross attention uses SDPA's math kernel (two matrix
# products and a softmax). The memory-efficient kernel, the fused one that takes a padding mask, runs one thread
# block per 64 query rows over all keys: a decoding step's few rows (the heads folded in) then read the whole input
# on one SM. On an H200 with 65,536 input tokens, bf16: 3.1 ms per layer and step against 0.21 ms for the math
# kernel (0.85 vs 0.21 ms at 16,384), and for a 128-token target in training (1,024 rows) 3.4 vs 1.8 ms forward. The
# math kernel materialises the scores in float32 (it upcasts bf16), 512 MiB at this size, and as much again for the
# probabilities that training keeps: beyond it the fused kernel's memory saving wins.
MATH_CROSS_ATTENTION_MAX_SCORES = 2**27


class CoLT5MultiQueryCrossAttention(nn.Module):
    """Cross attention from the decoder to the encoder output with one key/value head for all query heads
    (multi-query attention, the paper's section 3.2): the cache holds one head's keys/values per layer, computed at
    the first decoding step."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.decoder_num_heads
        self.head_dim = config.decoder_head_dim
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(config.hidden_size, 2 * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        """
        Args:
            hidden_states: `(batch, length, hidden)`, the decoder tokens.
            encoder_hidden_states: `(batch, input_length, hidden)`.
            encoder_attention_mask: bool `(batch, 1, 1, input_length)`, True for input tokens; None: all.
            cache: the decoder's cache; its cross-attention part keeps this layer's keys/values once computed.
        Returns: `(batch, length, hidden)`.
        """
        batch, length, _ = hidden_states.shape
        if cache is not None and cache.is_updated.get(self.layer_idx):
            cached = cache.cross_attention_cache.layers[self.layer_idx]
            k, v = cached.keys, cached.values
        else:
            k, v = self.kv_proj(encoder_hidden_states).unsqueeze(1).chunk(2, dim=-1)
            if cache is not None:
                k, v = cache.cross_attention_cache.update(k, v, self.layer_idx)
                cache.is_updated[self.layer_idx] = True
        # Every head attends to the same keys/values, so the heads fold into the query axis of one attention call.
        q = self.q_proj(hidden_states).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        q = q.reshape(batch, 1, self.num_heads * length, self.head_dim)
        out = masked_sdpa(
            q, k, v, encoder_attention_mask, self.attention_dropout if self.training else 0.0,
            math_only=batch * q.shape[2] * k.shape[2] <= MATH_CROSS_ATTENTION_MAX_SCORES,
        )
        out = out.view(batch, self.num_heads, length, self.head_dim).transpose(1, 2)
        return self.o_proj(out.reshape(batch, length, -1))


class CoLT5DecoderLayer(GradientCheckpointingLayer):
    """A pre-norm decoder block: causal self-attention, multi-query cross attention to the encoder output, gated
    MLP, each added to the residual stream."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = CoLT5DecoderSelfAttention(config, layer_idx)
        self.cross_attn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.cross_attn = CoLT5MultiQueryCrossAttention(config, layer_idx)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.decoder_intermediate_size, ACT2FN[config.hidden_act])
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None,
        cache: EncoderDecoderCache | None = None,
    ) -> torch.Tensor:
        """`(batch, length, hidden)` -> `(batch, length, hidden)`; the masks and cache as in the attention layers."""
        self_cache = cache.self_attention_cache if cache is not None else None
        attended = self.self_attn(self.self_attn_norm(hidden_states), position_embeddings, attention_mask, self_cache)
        hidden_states = hidden_states + self.dropout(attended)
        attended = self.cross_attn(
            self.cross_attn_norm(hidden_states), encoder_hidden_states, encoder_attention_mask, cache
        )
        hidden_states = hidden_states + self.dropout(attended)
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


def _encoder_attention_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """The encoder's `(batch, input_length)` padding mask as the cross attention's bool `(batch, 1, 1,
    input_length)`. A sample without any input token attends to all positions, so that its outputs stay finite."""
    if attention_mask is None:
        return None
    mask = attention_mask.bool()
    mask = mask | ~mask.any(-1, keepdim=True)
    return mask[:, None, None, :]


@auto_docstring(custom_intro="The decoder of `CoLT5ForConditionalGeneration`: dense pre-norm blocks over the output.")
class CoLT5Decoder(CoLT5PreTrainedModel):
    _can_record_outputs = {"hidden_states": CoLT5DecoderLayer}

    def __init__(self, config: CoLT5Config):
        super().__init__(config)
        self._no_split_modules = [CoLT5DecoderLayer.__name__]
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CoLT5DecoderLayer(config, idx) for idx in range(config.num_decoder_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.decoder_head_dim, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @accepts_past_key_values
    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, cached + sequence_length)`, *optional*):
            1 for decoder tokens, 0 for padding (the cached tokens and the new ones).
        encoder_hidden_states (`torch.Tensor` of shape `(batch_size, input_length, hidden_size)`):
            The encoder's output.
        encoder_attention_mask (`torch.Tensor` of shape `(batch_size, input_length)`, *optional*):
            The encoder's padding mask (1 = input token, 0 = padding).
        cache (`EncoderDecoderCache`, *optional*):
            The decoder's keys/values so far (self-attention) and the encoder output's (cross attention), updated in
            place; `use_cache=True` creates one. Also taken as `past_key_values`, its name before transformers 5.24.
        """
        if encoder_hidden_states is None:
            raise ValueError("The decoder needs encoder_hidden_states: the encoder's output for the same batch.")
        if cache is not None and not isinstance(cache, EncoderDecoderCache):
            raise ValueError(
                f"The decoder's cache must be an EncoderDecoderCache, got {type(cache).__name__}: pass "
                "EncoderDecoderCache(DynamicCache(), DynamicCache()) or use_cache=True (generate() does this)."
            )
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and (use_cache or cache is not None):
            # The checkpointed layers run twice; the second run would append to the cache again.
            logger.warning_once("The decoder uses no cache under gradient checkpointing: setting use_cache=False.")
            use_cache, cache = False, None
        past_length = cache.get_seq_length() if cache is not None else 0
        _validate_inputs(input_ids, inputs_embeds, attention_mask, past_length, prefix="decoder_")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        if tuple(encoder_hidden_states.shape[:1]) != (batch,):
            raise ValueError(
                f"encoder_hidden_states has batch size {encoder_hidden_states.shape[0]}, the decoder inputs {batch}."
            )
        if use_cache and cache is None and not self.training:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(past_length, past_length + length, device=device).expand(batch, length)
        else:
            position_ids = _expand_position_ids(position_ids, batch, length, name="decoder_position_ids")
        self_attention_mask = None
        if length > 1 or attention_mask is not None:
            queries = torch.arange(past_length, past_length + length, device=device)[:, None]
            keys = torch.arange(past_length + length, device=device)
            self_attention_mask = queries >= keys
            if attention_mask is not None:
                # A padded query with no key left (left padding) attends to itself: finite, and its output unused.
                self_attention_mask = (self_attention_mask & attention_mask.bool()[:, None, :]) | (queries == keys)
            self_attention_mask = self_attention_mask.expand(batch, length, past_length + length)[:, None]
        position_embeddings = self.rotary_emb(position_ids, inputs_embeds.dtype)
        cross_attention_mask = _encoder_attention_mask(encoder_attention_mask)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                self_attention_mask,
                encoder_hidden_states,
                cross_attention_mask,
                cache=cache,
            )
        return BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache}
        )


@auto_docstring(
    custom_intro=(
        "CoLT5 encoder-decoder (the paper's model): the routed CoLT5 encoder reads the long input, a dense decoder "
        "with multi-query cross attention writes the output; for AutoModelForSeq2SeqLM, Seq2SeqTrainer and "
        "generate()."
    )
)
class CoLT5ForConditionalGeneration(CoLT5PreTrainedModel, GenerationMixin):
    _tied_weights_keys = {
        "decoder.embed_tokens.weight": "model.embed_tokens.weight",
        "lm_head.weight": "model.embed_tokens.weight",
    }

    def __init__(self, config: CoLT5Config):
        if not config.is_encoder_decoder:
            raise ValueError(
                "CoLT5ForConditionalGeneration needs an encoder-decoder config: set is_encoder_decoder=True (and "
                "the decoder_* fields for the decoder's size)."
            )
        super().__init__(config)
        self._no_split_modules = [CoLT5Layer.__name__, CoLT5DecoderLayer.__name__]
        # The encoder is the backbone (`model`, as in the other heads): AutoModel loads it from this model's
        # checkpoints, and this model starts from a CoLT5Model checkpoint with a fresh decoder.
        self.model = CoLT5Model(config)
        self.decoder = CoLT5Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Labels are the decoder's own targets (T5's convention: the decoder inputs are the labels shifted right).
        self.loss_type = "ForMaskedLM"
        self.post_init()

    @property
    def encoder(self) -> CoLT5Model:
        """The routed encoder (`get_encoder()`, and `model` in the state dict)."""
        return self.model

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value
        if self.config.tie_word_embeddings:
            self.decoder.embed_tokens = value

    def _resize_token_embeddings(
        self, new_num_tokens: int | None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        embeddings = super()._resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        if self.decoder.embed_tokens is not embeddings:  # untied: the decoder's own input embedding follows
            self.decoder.embed_tokens = self._get_resized_embeddings(
                self.decoder.embed_tokens, embeddings.num_embeddings, mean_resizing=mean_resizing
            )
        return embeddings

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # The decoder creates its EncoderDecoderCache itself: generate()'s default DynamicCache(config) builds one
        # layer per config.num_hidden_layers, the encoder's depth, not num_decoder_layers.
        return False

    def _shift_right(self, labels: torch.LongTensor) -> torch.LongTensor:
        """Decoder inputs from labels: `decoder_start_token_id`, then the labels but the last, -100 as padding."""
        shifted = labels.new_full(labels.shape, self.config.decoder_start_token_id)
        shifted[:, 1:] = labels[:, :-1]
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else self.config.decoder_start_token_id
        return shifted.masked_fill(shifted == -100, pad)

    def prepare_decoder_input_ids_from_labels(self, labels: torch.LongTensor) -> torch.LongTensor:
        return self._shift_right(labels)

    @accepts_past_key_values
    @can_return_tuple
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        decoder_position_ids: torch.LongTensor | None = None,
        encoder_outputs: BaseModelOutputWithPast | tuple | None = None,
        cache: EncoderDecoderCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        decoder_inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> Seq2SeqLMOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, input_length)`, *optional*):
            The input's padding mask (1 = token, 0 = padding): the encoder routes and attends over valid tokens only
            and the cross attention ignores padding.
        decoder_input_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Decoder inputs; by default the labels shifted right behind `config.decoder_start_token_id`.
        decoder_attention_mask (`torch.Tensor` of shape `(batch_size, cached + target_length)`, *optional*):
            The decoder inputs' padding mask; the self-attention is causal in any case.
        decoder_position_ids (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Rotary positions of the decoder inputs (default: 0, 1, ... after the cached tokens).
        encoder_outputs (`BaseModelOutputWithPast` or tuple, *optional*):
            The encoder's output for the batch (generate() passes it); computed from `input_ids` otherwise.
        cache (`EncoderDecoderCache`, *optional*):
            The decoder's cache, updated in place (`use_cache=True` creates one). Also taken as `past_key_values`,
            its name before transformers 5.24.
        decoder_inputs_embeds (`torch.Tensor` of shape `(batch_size, target_length, hidden_size)`, *optional*):
            Instead of `decoder_input_ids`.
        labels (`torch.LongTensor` of shape `(batch_size, target_length)`, *optional*):
            Target tokens, aligned with the decoder outputs (no shift); -100 is ignored.
        """
        if encoder_outputs is None:
            encoder_outputs = self.model(
                input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
            )
        elif isinstance(encoder_outputs, tuple):  # return_dict=False: (last_hidden_state, hidden_states, ...)
            encoder_outputs = BaseModelOutput(*encoder_outputs)
        if labels is not None and decoder_input_ids is None and decoder_inputs_embeds is None:
            decoder_input_ids = self._shift_right(labels)
        if decoder_input_ids is None and decoder_inputs_embeds is None:
            raise ValueError(
                "Pass decoder_input_ids (or decoder_inputs_embeds) or labels: the decoder needs inputs (labels are "
                "shifted right into decoder_input_ids)."
            )
        decoder_outputs = self.decoder(
            decoder_input_ids,
            attention_mask=decoder_attention_mask,
            position_ids=decoder_position_ids,
            encoder_hidden_states=encoder_outputs.last_hidden_state,
            encoder_attention_mask=attention_mask,
            cache=cache,
            inputs_embeds=decoder_inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = decoder_outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.config.vocab_size, **kwargs)
        return Seq2SeqLMOutput(
            loss=loss,
            logits=logits,
            decoder_hidden_states=decoder_outputs.hidden_states,
            decoder_attentions=decoder_outputs.attentions,
            encoder_last_hidden_state=encoder_outputs.last_hidden_state,
            encoder_hidden_states=encoder_outputs.hidden_states,
            encoder_attentions=encoder_outputs.attentions,
            **{CACHE_NAME: decoder_outputs.get(CACHE_NAME)},
        )


CoLT5Config.register_for_auto_class()
CoLT5Model.register_for_auto_class("AutoModel")
CoLT5ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CoLT5ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
CoLT5ForConditionalGeneration.register_for_auto_class("AutoModelForSeq2SeqLM")

__all__ = [
    "CoLT5PreTrainedModel",
    "CoLT5Model",
    "CoLT5ForCausalLM",
    "CoLT5ForSequenceClassification",
    "CoLT5Decoder",
    "CoLT5ForConditionalGeneration",
]
