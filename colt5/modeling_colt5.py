# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 models for transformers: the encoder backbone and a long-document classification head."""


import torch
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput, SequenceClassifierOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, auto_docstring, can_return_tuple
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_colt5 import CoLT5Config
from .routed_attention import ConditionalRoutedAttention
from .routed_block import ConditionalRoutedTransformerBlock
from .router import CoordinateDescentRouter


class CoLT5Layer(ConditionalRoutedTransformerBlock, GradientCheckpointingLayer):
    """One CoLT5 block built from the config (gradient checkpointing comes from `GradientCheckpointingLayer`)."""

    def __init__(self, config: CoLT5Config, layer_idx: int):
        super().__init__(
            config.hidden_size,
            num_heavy_tokens_q=config.routed_query_tokens,
            num_heavy_tokens_kv=config.routed_kv_tokens,
            num_heavy_ff_tokens=config.routed_ff_tokens,
            light_ff_hidden_dim=config.light_intermediate_size,
            heavy_ff_hidden_dim=config.heavy_intermediate_size,
            activation=ACT2FN[config.hidden_act],
            norm_eps=config.rms_norm_eps,
            dropout=config.hidden_dropout,
            attention_dropout=config.attention_dropout,
            router_kwargs=config.router_kwargs(),
            light_heads=config.light_num_heads,
            light_dim_head=config.light_head_dim,
            light_window_size=config.light_window_size,
            heavy_heads=config.heavy_num_heads,
            heavy_dim_head=config.heavy_head_dim,
            num_routed_kv=config.num_kv_routing_sets,
            multiply_keys_by_score=config.multiply_keys_by_score,
            multiply_queries_by_score=config.multiply_queries_by_score,
            learned_unrouted_output=config.learned_unrouted_query_output,
            rotary_theta=config.rope_theta,
        )
        self.layer_idx = layer_idx


@auto_docstring
class CoLT5PreTrainedModel(PreTrainedModel):
    config: CoLT5Config
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CoLT5Layer"]
    _can_record_outputs = {"hidden_states": CoLT5Layer}

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CoordinateDescentRouter):
            # Unit-norm-scale routing vectors: scores of RMS-normalised tokens start with unit spread, the scale
            # the soft top-k's eps = 1 is meant for.
            init.normal_(module.routing_vectors, std=module.routing_vectors.shape[-1] ** -0.5)
        elif isinstance(module, ConditionalRoutedAttention) and module.unrouted_output is not None:
            init.zeros_(module.unrouted_output)


def _validate_inputs(
    input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None
) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}.")
    if inputs_embeds is not None and inputs_embeds.dim() != 3:
        raise ValueError(f"inputs_embeds must be (batch, sequence, hidden), got shape {tuple(inputs_embeds.shape)}.")
    shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:2]
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(
            f"attention_mask must have the shape of the inputs (batch, sequence) = {tuple(shape)}, "
            f"got {tuple(attention_mask.shape)}: pass the tokenizer's 2-D padding mask (1 = token, 0 = padding)."
        )


@auto_docstring
class CoLT5Model(CoLT5PreTrainedModel):
    def __init__(self, config: CoLT5Config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([CoLT5Layer(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @merge_with_config_defaults
    @capture_outputs
    @auto_docstring
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutput:
        r"""
        attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
            1 for tokens, 0 for padding. Padding is never routed while a sample has valid tokens left, never
            attended to, and the routed amounts (fractions) follow each sample's own valid length.
        """
        _validate_inputs(input_ids, inputs_embeds, attention_mask)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        mask = attention_mask.bool() if attention_mask is not None else None
        batch, length = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(length, device=inputs_embeds.device)
        if position_ids.shape not in ((length,), (1, length), (batch, length)):
            raise ValueError(
                f"position_ids must have shape (sequence,), (1, sequence) or (batch, sequence) = {(batch, length)}, "
                f"got {tuple(position_ids.shape)}."
            )
        position_ids = position_ids.expand(batch, length)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


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
CoLT5ForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = ["CoLT5PreTrainedModel", "CoLT5Model", "CoLT5ForSequenceClassification"]
