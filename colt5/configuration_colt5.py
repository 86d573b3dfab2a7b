# Copyright 2026 The CoLT5 developers. Licensed under the Apache License, Version 2.0.
"""CoLT5 model configuration."""


from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .causal_router import validate_capacity
from .router import routed_amount, validate_amount
from .soft_topk import ROUTER_BACKENDS

# Where each class lives in a saved checkpoint, so every Auto class loads it as remote code.
COLT5_AUTO_MAP = {
    "AutoConfig": "configuration_colt5.CoLT5Config",
    "AutoModel": "modeling_colt5.CoLT5Model",
    "AutoModelForCausalLM": "modeling_colt5.CoLT5ForCausalLM",
    "AutoModelForSequenceClassification": "modeling_colt5.CoLT5ForSequenceClassification",
    "AutoModelForSeq2SeqLM": "modeling_colt5.CoLT5ForConditionalGeneration",
}


@strict
class CoLT5Config(PreTrainedConfig):
    r"""
    Configuration of a CoLT5 model (Ainslie et al., 2023, "CoLT5: Faster Long-Range Transformers with Conditional
    Computation"). Defaults are the paper's CoLT5-B encoder: 12 layers of width 768, light MLP 1024 and heavy MLP
    8192, 4 light and 8 heavy heads of 64, a 255-token local window, 1/16 of tokens routed to the heavy
    feedforward and as heavy queries, 1/8 as heavy keys/values, soft top-k with eps 1.0 normalised over 9/8 k. The
    causal model makes every token a heavy query by default (see `routed_query_tokens`).

    Routed amounts (`routed_ff_tokens`, `routed_query_tokens`, `routed_kv_tokens`) are an `int` (a fixed number of
    tokens) or a `float` in (0, 1] (a fraction of each sample's valid length, rounded up).

    With `is_causal=True` (`CoLT5ForCausalLM`) every output depends on earlier tokens only:
    `routed_query_tokens` and `routed_ff_tokens` are target fractions (floats) for per-token routers with running
    thresholds (`routed_query_tokens=1.0`, the causal default, makes every token a heavy query, with no query
    router); `routed_kv_tokens` is the size of the routed key/value memory each block of `causal_block_size`
    tokens attends to (an int, or a float as a fraction of `max_position_embeddings`), routed from the tokens
    before the block.

    With `is_encoder_decoder=True` (`CoLT5ForConditionalGeneration`, the paper's model) the routed encoder reads the
    input and a decoder of dense pre-norm blocks writes the output: causal self-attention with rotary positions,
    then multi-query cross attention to the encoder output (all `decoder_num_heads` query heads share one key/value
    head: the paper's section 3.2, which makes each decoding step read 1/heads of the encoder's keys and values),
    then a gated MLP.

    Args:
        vocab_size: vocabulary size.
        hidden_size: model width.
        num_hidden_layers: number of CoLT5 blocks.
        light_num_heads, light_head_dim: light (local) attention heads and head width.
        heavy_num_heads, heavy_head_dim: heavy (routed) attention heads and head width.
        light_window_size: every token attends to this many tokens on each side in the light branch.
        light_intermediate_size, heavy_intermediate_size: light and heavy MLP widths.
        routed_ff_tokens: tokens routed to the heavy MLP.
        routed_query_tokens: tokens routed as heavy-attention queries. None (the default) is 1/16 for the encoder
            (the paper's) and 1.0, every token, for the causal model: a causal per-token query router learns only
            from the tokens it already routes, and on passkey retrieval it never learned to route the token that
            has to read the key (README, "Retrieval").
        routed_kv_tokens: tokens routed as heavy-attention keys/values, per routing set.
        num_kv_routing_sets: key/value routing sets; the heavy heads are split evenly among them.
        router_eps: entropy weight of the soft top-k (the final eps when a schedule is set).
        router_iterations: None for the exact fixed point, else the paper's coordinate-descent iterations.
        router_eps_schedule: `[start, decay]`: iteration t uses `max(start * decay**t, router_eps)`.
        router_fetch_ratio: the soft top-k normalises over `router_fetch_ratio * k` tokens.
        router_straight_through: routed outputs are weighted by 1 in the forward pass, lambda's gradient backward.
        route_block_size: route evenly over blocks of this many tokens (None: over the whole sequence).
        router_backend: "auto" (Triton kernels for CUDA tensors, PyTorch otherwise; the environment variable
            COLT5_ROUTER_BACKEND=torch overrides it), "torch" (always PyTorch, e.g. for comparison) or "triton".
        random_routing: every router scores tokens at random instead of by content (fresh standard-normal draws
            on every call): an ablation control for learned routing, not for use.
        multiply_keys_by_score: scale routed keys by their router weight (values always are).
        multiply_queries_by_score: scale routed queries by their router weight (outputs always are).
        learned_unrouted_query_output: a learned heavy-attention output for queries that were not routed.
        rope_theta: rotary embedding base (absolute positions in both attention branches).
        max_position_embeddings: the longest sequence the model is meant for (rotary embeddings themselves have
            no limit).
        is_causal: causal model (`CoLT5ForCausalLM`): causal light attention, per-token query and feedforward
            routing, and a routed key/value memory per block.
        causal_block_size: with `is_causal`, the key/value memory is re-routed every this many tokens; a routed
            query attends to its block's memory and to every earlier token of its own block.
        causal_router_prefix_normalization: with `is_causal`, the per-token routers threshold each score
            standardised by the mean and variance of its sample's scores up to it, which keeps the routed share at
            its target while training moves all scores at once (see `ThresholdRouter`). False: raw scores, the
            routing of checkpoints saved before this option. None: True for a new config, False for one loaded
            from a file that lacks the key (saved before the option existed).
        causal_router_momentum: with `is_causal`, the weight of each training batch in the moving averages of the
            per-token routers' thresholds; None: the routers' default (1.0 with prefix normalization, i.e. the
            last training batch's statistics; 0.05 without).
        causal_router_capacity_factor, causal_router_capacity_burst: with `is_causal`, in training each per-token
            router's heavy branch takes at most `ceil(factor * fraction * n) + burst` tokens of a sample (the
            feedforward) or of a block (the queries), chosen by a causal token bucket, so that a training step has
            static shapes and no host synchronisation; a routed token beyond that is dropped (it takes the light
            branch only). Evaluation and generation keep every routed token. Factor None: no limit (the heavy
            branch then selects its tokens with a host synchronisation).
        cuda_graph_decoding: with `is_causal`, on a GPU, one-token steps with a cache (generate()'s decoding, in
            evaluation without gradients) replay a CUDA graph of the whole step, captured at the second step of a
            cache: decoding is otherwise host-bound. False: every step runs eagerly.
        compile_decoding: with `cuda_graph_decoding`, the captured step is first compiled with torch.compile, which
            fuses its several hundred small kernels into fewer (the replayed step is bound by their number). Costs
            a compile the first time a process decodes (see README, "Generation benchmark").
        use_cache: with `is_causal`, return a `CoLT5Cache` for fast generation; with `is_encoder_decoder`, an
            `EncoderDecoderCache` of the decoder's keys/values.
        is_encoder_decoder: the encoder-decoder model (`CoLT5ForConditionalGeneration`); the fields above describe
            its encoder.
        num_decoder_layers: decoder blocks (None: `num_hidden_layers`).
        decoder_num_heads, decoder_head_dim: decoder self-attention heads and head width; the cross attention has as
            many query heads and one key/value head.
        decoder_intermediate_size: decoder MLP width.
        decoder_start_token_id: the first decoder input (None: `pad_token_id`, as in T5).
        hidden_act: MLP activation (a key of transformers' ACT2FN).
        hidden_dropout: dropout on each branch's output.
        attention_dropout: dropout on attention probabilities.
        rms_norm_eps: RMSNorm epsilon.
        initializer_range: standard deviation of the normal weight initialisation.
        tie_word_embeddings: tie input and output embeddings.

    ```python
    >>> from colt5 import CoLT5Config, CoLT5Model
    >>> config = CoLT5Config(hidden_size=256, num_hidden_layers=2, light_intermediate_size=128,
    ...                      heavy_intermediate_size=1024)
    >>> model = CoLT5Model(config)
    ```"""

    model_type = "colt5"

    vocab_size: int = 32128
    hidden_size: int = 768
    num_hidden_layers: int = 12
    light_num_heads: int = 4
    light_head_dim: int = 64
    heavy_num_heads: int = 8
    heavy_head_dim: int = 64
    light_window_size: int = 127
    light_intermediate_size: int = 1024
    heavy_intermediate_size: int = 8192
    routed_ff_tokens: int | float = 1 / 16
    routed_query_tokens: int | float | None = None
    routed_kv_tokens: int | float = 1 / 8
    num_kv_routing_sets: int = 1
    router_eps: float = 1.0
    router_iterations: int | None = None
    router_eps_schedule: list[float] | None = None
    router_fetch_ratio: float = 9 / 8
    router_straight_through: bool = False
    route_block_size: int | None = None
    router_backend: str = "auto"
    random_routing: bool = False
    multiply_keys_by_score: bool = True
    multiply_queries_by_score: bool = False
    learned_unrouted_query_output: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 16384
    is_causal: bool = False
    causal_block_size: int = 1024
    causal_router_prefix_normalization: bool | None = None
    causal_router_momentum: float | None = None
    causal_router_capacity_factor: float | None = 1.5
    causal_router_capacity_burst: int = 64
    cuda_graph_decoding: bool = True
    compile_decoding: bool = False
    use_cache: bool = True
    is_encoder_decoder: bool = False
    num_decoder_layers: int | None = None
    decoder_num_heads: int = 12
    decoder_head_dim: int = 64
    decoder_intermediate_size: int = 2048
    decoder_start_token_id: int | None = None
    hidden_act: str = "gelu_pytorch_tanh"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = 1

    def __post_init__(self, **kwargs):
        if self.routed_query_tokens is None:
            self.routed_query_tokens = 1.0 if self.is_causal else 1 / 16
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_hidden_layers
        if self.is_encoder_decoder and self.decoder_start_token_id is None:
            self.decoder_start_token_id = self.pad_token_id
        if self.causal_router_prefix_normalization is None:
            # A file saved before the option carries transformers_version and every other field: its weights were
            # trained on raw scores. A new config (no transformers_version yet) takes the better routing.
            self.causal_router_prefix_normalization = self.transformers_version is None
        self._validate_colt5()
        super().__post_init__(**kwargs)
        if getattr(self, "auto_map", None) is None:
            self.auto_map = dict(COLT5_AUTO_MAP)

    def _validate_colt5(self) -> None:
        """Raise a ValueError naming the field and its allowed range for every invalid value or combination."""
        at_least_one = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "light_num_heads",
            "light_head_dim",
            "heavy_num_heads",
            "heavy_head_dim",
            "light_window_size",
            "light_intermediate_size",
            "heavy_intermediate_size",
            "num_kv_routing_sets",
            "max_position_embeddings",
            "causal_block_size",
            "num_decoder_layers",
            "decoder_num_heads",
            "decoder_head_dim",
            "decoder_intermediate_size",
        )
        for name in at_least_one:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        for name in ("light_head_dim", "heavy_head_dim", "decoder_head_dim"):
            if getattr(self, name) % 2:
                raise ValueError(f"{name} must be even (rotary embeddings rotate pairs), got {getattr(self, name)}.")
        if self.heavy_num_heads % self.num_kv_routing_sets:
            raise ValueError(
                f"heavy_num_heads ({self.heavy_num_heads}) must be divisible by num_kv_routing_sets "
                f"({self.num_kv_routing_sets}): the heavy heads are split evenly among the key/value routing sets."
            )
        for name in ("routed_ff_tokens", "routed_query_tokens", "routed_kv_tokens"):
            validate_amount(name, getattr(self, name))
        if not self.router_eps > 0:
            raise ValueError(f"router_eps must be > 0, got {self.router_eps}.")
        if self.router_iterations is not None and self.router_iterations < 1:
            raise ValueError(
                f"router_iterations must be None (exact fixed point) or >= 1, got {self.router_iterations}."
            )
        if self.router_eps_schedule is not None:
            if self.router_iterations is None:
                raise ValueError(
                    "router_eps_schedule needs router_iterations: the exact router (router_iterations=None) has "
                    "no iterations to schedule."
                )
            if len(self.router_eps_schedule) != 2:
                raise ValueError(
                    f"router_eps_schedule must be [start, decay], got {self.router_eps_schedule}."
                )
            start, decay = self.router_eps_schedule
            if not start > 0 or not 0 < decay <= 1:
                raise ValueError(
                    f"router_eps_schedule [start, decay] needs start > 0 and decay in (0, 1], got {[start, decay]}."
                )
        if not self.router_fetch_ratio >= 1:
            raise ValueError(f"router_fetch_ratio must be >= 1, got {self.router_fetch_ratio}.")
        if self.route_block_size is not None and self.route_block_size < 1:
            raise ValueError(f"route_block_size must be None or >= 1, got {self.route_block_size}.")
        if self.router_backend not in ROUTER_BACKENDS:
            raise ValueError(f"router_backend must be one of {ROUTER_BACKENDS}, got {self.router_backend!r}.")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}.")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}.")
        if not self.initializer_range >= 0:
            raise ValueError(f"initializer_range must be >= 0, got {self.initializer_range}.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id must be None or in [0, vocab_size={self.vocab_size}), got {self.pad_token_id}."
            )
        if self.causal_router_momentum is not None and not 0 < self.causal_router_momentum <= 1:
            raise ValueError(f"causal_router_momentum must be in (0, 1], got {self.causal_router_momentum}.")
        validate_capacity(
            "causal_router_capacity_factor",
            self.causal_router_capacity_factor,
            "causal_router_capacity_burst",
            self.causal_router_capacity_burst,
        )
        if self.compile_decoding and not self.cuda_graph_decoding:
            raise ValueError(
                "compile_decoding compiles the CUDA-graph decode step: it needs cuda_graph_decoding=True (or set "
                "compile_decoding=False for eager decoding)."
            )
        if self.is_causal:
            self._validate_causal()
        if self.is_encoder_decoder:
            self._validate_encoder_decoder()

    def _validate_causal(self) -> None:
        for name in ("routed_query_tokens", "routed_ff_tokens"):
            if not isinstance(getattr(self, name), float):
                raise ValueError(
                    f"{name} must be a fraction (a float in (0, 1]) when is_causal=True: the causal model decides "
                    f"per token, with a threshold that routes that share of tokens; got {getattr(self, name)!r}."
                )
        if self.learned_unrouted_query_output and self.routed_query_tokens == 1:
            raise ValueError(
                "learned_unrouted_query_output needs routed_query_tokens < 1.0 when is_causal=True: with 1.0 (the "
                "causal default) every token is a heavy query, so no token is left unrouted."
            )
        if self.route_block_size is not None:
            raise ValueError(
                "route_block_size must be None when is_causal=True: the causal key/value memory is routed per "
                "block of causal_block_size tokens already."
            )

    def _validate_encoder_decoder(self) -> None:
        if self.is_causal:
            raise ValueError(
                "is_encoder_decoder and is_causal exclude each other: the encoder-decoder model routes over the whole "
                "input in its encoder (is_causal=False) and decodes with a causal decoder of its own."
            )
        if self.decoder_start_token_id is None:
            raise ValueError(
                "The encoder-decoder model needs decoder_start_token_id (or pad_token_id, its default): the token "
                "that starts every decoder input."
            )
        if not 0 <= self.decoder_start_token_id < self.vocab_size:
            raise ValueError(
                f"decoder_start_token_id must be in [0, vocab_size={self.vocab_size}), got "
                f"{self.decoder_start_token_id}."
            )

    def routed_memory_size(self) -> int:
        """Routed keys/values per block of the causal model: `routed_kv_tokens` itself, or that fraction of
        `max_position_embeddings`."""
        return routed_amount(self.routed_kv_tokens, self.max_position_embeddings)

    def router_kwargs(self) -> dict:
        """Settings shared by every router of the model, as `CoordinateDescentRouter` keyword arguments."""
        return dict(
            fetch_ratio=self.router_fetch_ratio,
            eps=self.router_eps,
            n_iters=self.router_iterations,
            # Without a schedule a constant eps, not the routers' default eps-scaling from 4.0 (colt5-attention's).
            eps_schedule=self.router_eps_schedule or (self.router_eps, 1.0),
            straight_through=self.router_straight_through,
            route_block_size=self.route_block_size,
            backend=self.router_backend,
            random_routing=self.random_routing,
        )


__all__ = ["CoLT5Config"]
