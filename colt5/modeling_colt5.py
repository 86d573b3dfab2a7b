# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 models for transformers: the backbone (encoder, or causal with `config.is_causal`), a causal language
model head with cached generation, and a long-document classification head."""


import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast, SequenceClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .cache_colt5 import CACHE_NAME, CoLT5Cache, accepts_past_key_values
from .causal_attention import CausalRoutedAttention
from .causal_router import ThresholdRouter
from .configuration_colt5 import CoLT5Config
from .routed_attention import ConditionalRoutedAttention
from .routed_block import CausalRoutedTransformerBlock, ConditionalRoutedTransformerBlock
from .router import TokenScorer


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
            router_momentum=config.causal_router_momentum,
            light_window_size=config.light_window_size,
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
        if isinstance(module, (ConditionalRoutedAttention, CausalRoutedAttention)) and module.unrouted_output is not None:
            init.zeros_(module.unrouted_output)


def _validate_inputs(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past_length: int = 0,
) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (batch, sequence, hidden), got shape {tuple(inputs_embeds.shape)}.")
    batch, length = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if attention_mask is not None and tuple(attention_mask.shape) != (batch, past_length + length):
        cached = f" (the {past_length} cached tokens and the {length} new ones)" if past_length else ""
        raise ValueError(
            f"attention_mask must have shape (batch, sequence) = {(batch, past_length + length)}{cached}, "
            f"got {tuple(attention_mask.shape)}: pass the tokenizer's 2-D padding mask (1 = token, 0 = padding)."
        )


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
        past_length = cache.get_seq_length() if cache is not None else 0
        _validate_inputs(input_ids, inputs_embeds, attention_mask, past_length)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        mask = attention_mask[:, past_length:].bool() if attention_mask is not None else None
        if causal and use_cache and cache is None:
            cache = CoLT5Cache(self.config)
        valid_counts = None
        if cache is not None:
            if past_length == 0:
                cache.valid_counts = [0] * batch
            elif mask is not None:
                if not bool(mask.all()):
                    raise ValueError(
                        "With a cache, new tokens must all be valid (attention_mask 1): CoLT5 takes padding in the "
                        "first forward pass (the prompt) only."
                    )
                mask = None
            valid_counts = cache.valid_counts
        position_ids = self._position_ids(position_ids, mask, batch, length, inputs_embeds.device, valid_counts)

        hidden_states = inputs_embeds
        for idx, layer in enumerate(self.layers):
            if causal:
                cache_layer = cache.layers[idx] if cache is not None else None
                hidden_states, state = layer(
                    hidden_states,
                    attention_mask=mask,
                    position_ids=position_ids,
                    state=cache_layer.state if cache_layer is not None else None,
                    valid_counts=valid_counts,
                )
                if cache_layer is not None:
                    cache_layer.state = state
            else:
                hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)
        if cache is not None:
            added = [length] * batch if mask is None else mask.sum(-1).tolist()
            cache.valid_counts = [count + new for count, new in zip(valid_counts, added)]
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), **{CACHE_NAME: cache})

    def _position_ids(
        self,
        position_ids: torch.Tensor | None,
        mask: torch.Tensor | None,
        batch: int,
        length: int,
        device: torch.device,
        valid_counts: list[int] | None,
    ) -> torch.Tensor:
        """`(batch, length)` rotary positions: the given ones broadcast, else 0..n-1 for the encoder and the valid
        index (padding does not count, cached tokens do) for the causal model."""
        if position_ids is not None:
            if position_ids.shape not in ((length,), (1, length), (batch, length)):
                raise ValueError(
                    "position_ids must have shape (sequence,), (1, sequence) or (batch, sequence) = "
                    f"{(batch, length)}, got {tuple(position_ids.shape)}."
                )
            return position_ids.expand(batch, length)
        if not self.config.is_causal:
            return torch.arange(length, device=device).expand(batch, length)
        if mask is None:
            position_ids = torch.arange(length, device=device).expand(batch, length)
        else:
            position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)
        if valid_counts is not None:
            position_ids = position_ids + torch.tensor(valid_counts, device=device).unsqueeze(-1)
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


CoLT5Config.register_for_auto_class()
CoLT5Model.register_for_auto_class("AutoModel")
CoLT5ForCausalLM.register_for_auto_class("AutoModelForCausalLM")
CoLT5ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["CoLT5PreTrainedModel", "CoLT5Model", "CoLT5ForCausalLM", "CoLT5ForSequenceClassification"]
