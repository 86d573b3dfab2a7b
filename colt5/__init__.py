# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 (conditionally routed long-range transformers) for Hugging Face transformers.

Importing the package registers the config and models with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
)

from .autoregressive_attention import ConditionalRoutedAutoregressiveAttention
from .cache_colt5 import CoLT5Cache
from .causal_attention import CausalRoutedAttention
from .causal_router import ThresholdRouter, route_block_memory
from .configuration_colt5 import CoLT5Config
from .convert_colt5_attention import from_colt5_attention
from .cross_attention import ConditionalRoutedCrossAttention
from .image_attention import ConditionalRoutedImageAttention
from .modeling_colt5 import (
    CoLT5Decoder,
    CoLT5ForCausalLM,
    CoLT5ForConditionalGeneration,
    CoLT5ForSequenceClassification,
    CoLT5Model,
    CoLT5PreTrainedModel,
)
from .routed_attention import ConditionalRoutedAttention
from .routed_block import CausalRoutedTransformerBlock, ConditionalRoutedTransformerBlock
from .routed_feedforward import CausalRoutedFeedForward, ConditionalRoutedFeedForward, GatedMLP, GeluMLP
from .router import CoordinateDescentRouter, RouterOutput, RouterReturn, route
from .soft_topk import TopkReturn, coor_descent, soft_topk, topk
from .vit import ConditionalRoutedViT

AutoConfig.register(CoLT5Config.model_type, CoLT5Config, exist_ok=True)
AutoModel.register(CoLT5Config, CoLT5Model, exist_ok=True)
AutoModelForCausalLM.register(CoLT5Config, CoLT5ForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(CoLT5Config, CoLT5ForSequenceClassification, exist_ok=True)
AutoModelForSeq2SeqLM.register(CoLT5Config, CoLT5ForConditionalGeneration, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "CoLT5Cache",
    "CoLT5Config",
    "CoLT5Decoder",
    "CoLT5ForCausalLM",
    "CoLT5ForConditionalGeneration",
    "CoLT5Model",
    "CoLT5ForSequenceClassification",
    "CoLT5PreTrainedModel",
    "CausalRoutedAttention",
    "CausalRoutedFeedForward",
    "CausalRoutedTransformerBlock",
    "ConditionalRoutedAttention",
    "ConditionalRoutedAutoregressiveAttention",
    "ConditionalRoutedCrossAttention",
    "ConditionalRoutedImageAttention",
    "ConditionalRoutedFeedForward",
    "ConditionalRoutedTransformerBlock",
    "ConditionalRoutedViT",
    "CoordinateDescentRouter",
    "GatedMLP",
    "GeluMLP",
    "RouterOutput",
    "RouterReturn",
    "ThresholdRouter",
    "TopkReturn",
    "coor_descent",
    "from_colt5_attention",
    "route",
    "route_block_memory",
    "soft_topk",
    "topk",
]
