"""Tests of CoLT5ForConditionalGeneration (modeling_colt5.py's encoder-decoder): config, shapes and loss, the
decoder's causality and its independence of padded input, cached generation (greedy, beam search, sampling),
gradient checkpointing, saving and loading (installed and as remote code)."""

import textwrap

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoModelForSeq2SeqLM, DynamicCache, EncoderDecoderCache

from colt5 import CoLT5Config, CoLT5ForConditionalGeneration
from colt5.cache_colt5 import CACHE_NAME

SEQ2SEQ = dict(
    is_encoder_decoder=True,
    num_decoder_layers=3,
    decoder_num_heads=4,
    decoder_head_dim=16,
    decoder_intermediate_size=96,
)


def length_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


def random_ids(batch, n, vocab_size=300):
    return torch.randint(2, vocab_size, (batch, n))


@pytest.fixture
def seq2seq_config(tiny_config):
    """Factory: a tiny encoder-decoder config (overrides win)."""
    return lambda **overrides: tiny_config(**{**SEQ2SEQ, **overrides})


@pytest.fixture
def model(seq2seq_config):
    model = CoLT5ForConditionalGeneration(seq2seq_config()).eval()
    with torch.no_grad():  # a random model's logits tie too easily for greedy comparisons
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


# ===================================================================================================== config


def test_config_defaults_for_the_decoder(seq2seq_config):
    config = CoLT5Config(is_encoder_decoder=True)
    assert config.num_decoder_layers == config.num_hidden_layers == 12
    assert (config.decoder_num_heads, config.decoder_head_dim, config.decoder_intermediate_size) == (12, 64, 2048)
    assert config.decoder_start_token_id == config.pad_token_id == 0
    assert seq2seq_config(decoder_start_token_id=5).decoder_start_token_id == 5
    assert CoLT5Config().decoder_start_token_id is None  # only the encoder-decoder needs one


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(is_causal=True), "is_causal"),
        (dict(num_decoder_layers=0), "num_decoder_layers"),
        (dict(decoder_num_heads=0), "decoder_num_heads"),
        (dict(decoder_head_dim=15), "decoder_head_dim"),
        (dict(decoder_intermediate_size=0), "decoder_intermediate_size"),
        (dict(decoder_start_token_id=300), "decoder_start_token_id"),
        (dict(pad_token_id=None), "decoder_start_token_id"),
    ],
)
def test_config_validation_names_the_decoder_field(seq2seq_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        seq2seq_config(**overrides)


def test_config_rejects_wrongly_typed_decoder_field(seq2seq_config):
    with pytest.raises(StrictDataclassFieldValidationError):
        seq2seq_config(decoder_num_heads="4")


def test_model_needs_an_encoder_decoder_config(tiny_config):
    with pytest.raises(ValueError, match="is_encoder_decoder=True"):
        CoLT5ForConditionalGeneration(tiny_config())


# ===================================================================================================== forward


def test_shapes_loss_and_multi_query_cross_attention(model):
    ids, mask = random_ids(2, 40), length_mask([40, 25], 40)
    labels = random_ids(2, 7)
    labels[1, 5:] = -100
    out = model(ids, attention_mask=mask, labels=labels, use_cache=True)
    assert out.logits.shape == (2, 7, 300)
    assert out.encoder_last_hidden_state.shape == (2, 40, 64)
    valid = labels != -100
    expected = torch.nn.functional.cross_entropy(out.logits[valid], labels[valid])
    torch.testing.assert_close(out.loss, expected)
    cache = out[CACHE_NAME]
    assert isinstance(cache, EncoderDecoderCache)
    assert cache.get_seq_length() == 7
    # Multi-query: one key/value head per layer for the cross attention, the decoder's heads for self-attention.
    assert cache.cross_attention_cache.layers[0].keys.shape == (2, 1, 40, 16)
    assert cache.self_attention_cache.layers[0].keys.shape == (2, 4, 7, 16)
    cross = model.decoder.layers[0].cross_attn
    assert (cross.kv_proj.out_features, cross.q_proj.out_features) == (2 * 16, 64)


def test_labels_are_shifted_right_into_decoder_inputs(model):
    labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
    expected = torch.tensor([[0, 5, 6, 7], [0, 8, 9, 0]])
    assert torch.equal(model.prepare_decoder_input_ids_from_labels(labels), expected)
    ids = random_ids(2, 30)
    with torch.no_grad():
        from_labels = model(ids, labels=labels)
        explicit = model(ids, decoder_input_ids=expected, labels=labels)
    assert torch.equal(from_labels.logits, explicit.logits)
    assert torch.equal(from_labels.loss, explicit.loss)


def test_decoder_inputs_are_required_and_named_in_errors(model):
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(random_ids(1, 20))
    decoder_ids = random_ids(1, 3)
    with pytest.raises(ValueError, match="exactly one of decoder_input_ids or decoder_inputs_embeds"):
        model(random_ids(1, 20), decoder_input_ids=decoder_ids, decoder_inputs_embeds=torch.randn(1, 3, 64))
    with pytest.raises(ValueError, match="decoder_attention_mask must have shape"):
        model(random_ids(1, 20), decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="decoder_position_ids must have shape"):
        model(random_ids(1, 20), decoder_input_ids=decoder_ids, decoder_position_ids=torch.arange(4))


def test_embeddings_equal_ids(model):
    ids, decoder_ids = random_ids(2, 30), random_ids(2, 6)
    embed = model.get_input_embeddings()
    with torch.no_grad():
        from_ids = model(ids, decoder_input_ids=decoder_ids).logits
        from_embeds = model(inputs_embeds=embed(ids), decoder_inputs_embeds=embed(decoder_ids)).logits
    torch.testing.assert_close(from_embeds, from_ids, atol=1e-6, rtol=1e-6)


def test_loss_divides_by_num_items_in_batch(model):
    """Trainer passes the label count of the whole accumulation window; the loss sums over this batch's labels."""
    ids, labels = random_ids(2, 30), random_ids(2, 5)
    labels[1, 3:] = -100
    with torch.no_grad():
        mean = model(ids, labels=labels).loss
        scaled = model(ids, labels=labels, num_items_in_batch=torch.tensor(16)).loss
    torch.testing.assert_close(scaled, mean * 8 / 16)


def test_decoder_is_causal(model):
    ids = random_ids(1, 30)
    decoder_ids = random_ids(1, 9)
    changed = decoder_ids.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 300
    with torch.no_grad():
        a = model(ids, decoder_input_ids=decoder_ids).logits
        b = model(ids, decoder_input_ids=changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_outputs_do_not_depend_on_padded_input_positions(model):
    ids, mask = random_ids(2, 40), length_mask([40, 22], 40)
    other = ids.clone()
    other[1, 22:] = random_ids(1, 18)
    decoder_ids = random_ids(2, 6)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        b = model(other, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        alone = model(ids[1:, :22], decoder_input_ids=decoder_ids[1:]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1:], alone, atol=1e-5, rtol=1e-5)


def test_left_padded_decoder_inputs_equal_the_unpadded_ones(model):
    ids = random_ids(2, 30)
    decoder_ids = random_ids(2, 5)
    padded = torch.cat([torch.zeros(2, 2, dtype=torch.long), decoder_ids], dim=1)
    padded[0, :2] = decoder_ids[0, :2]  # the first sample is not padded: the same batch, two layouts
    mask = torch.tensor([[1] * 7, [0, 0, 1, 1, 1, 1, 1]])
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        alone = model(ids[1:], decoder_input_ids=decoder_ids[1:]).logits
        batched = model(ids, decoder_input_ids=padded, decoder_attention_mask=mask, decoder_position_ids=positions)
    torch.testing.assert_close(batched.logits[1:, 2:], alone, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(batched.logits).all()


def test_input_without_a_valid_token_gives_finite_outputs(model):
    mask = length_mask([30, 0], 30)
    with torch.no_grad():
        logits = model(random_ids(2, 30), attention_mask=mask, decoder_input_ids=random_ids(2, 4)).logits
    assert torch.isfinite(logits).all()


def test_encoder_outputs_reused_and_tuple_outputs(model):
    ids, mask = random_ids(2, 30), length_mask([30, 18], 30)
    decoder_ids = random_ids(2, 5)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids)
        encoded = model.get_encoder()(ids, attention_mask=mask)
        reused = model(attention_mask=mask, decoder_input_ids=decoder_ids, encoder_outputs=encoded)
        as_tuple = model(attention_mask=mask, decoder_input_ids=decoder_ids, encoder_outputs=(encoded[0],),
                         return_dict=False, use_cache=False)
    assert torch.equal(full.logits, reused.logits)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)


def test_hidden_states_of_encoder_and_decoder(model):
    with torch.no_grad():
        out = model(random_ids(1, 30), decoder_input_ids=random_ids(1, 5), output_hidden_states=True)
    assert len(out.encoder_hidden_states) == 3 and len(out.decoder_hidden_states) == 4
    assert out.decoder_hidden_states[0].shape == (1, 5, 64)


@pytest.mark.parametrize("tie", [True, False])
def test_resize_token_embeddings_resizes_all_three(seq2seq_config, tie):
    model = CoLT5ForConditionalGeneration(seq2seq_config(tie_word_embeddings=tie)).eval()
    model.resize_token_embeddings(320)
    sizes = [m.weight.shape[0] for m in (model.model.embed_tokens, model.decoder.embed_tokens, model.lm_head)]
    assert sizes == [320, 320, 320] and model.config.vocab_size == 320
    assert (model.decoder.embed_tokens.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        logits = model(torch.full((1, 12), 310), decoder_input_ids=torch.tensor([[315, 2]])).logits
    assert logits.shape == (1, 2, 320) and torch.isfinite(logits).all()


def test_tied_and_untied_embeddings(seq2seq_config):
    tied = CoLT5ForConditionalGeneration(seq2seq_config())
    assert tied.decoder.embed_tokens.weight is tied.model.embed_tokens.weight is tied.lm_head.weight
    untied = CoLT5ForConditionalGeneration(seq2seq_config(tie_word_embeddings=False))
    weights = {id(untied.model.embed_tokens.weight), id(untied.decoder.embed_tokens.weight),
               id(untied.lm_head.weight)}
    assert len(weights) == 3


@pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")
@pytest.mark.parametrize("use_cache", [False, True])
def test_gradient_checkpointing_gives_same_gradients(seq2seq_config, use_cache):
    """With a cache passed in too: the checkpointed layers' second run must not append to it again (the decoder
    drops it under checkpointing, as transformers' layers do)."""
    model = CoLT5ForConditionalGeneration(seq2seq_config()).train()
    ids, mask = random_ids(2, 40), length_mask([40, 30], 40)
    labels = random_ids(2, 8)

    def gradients():
        model.zero_grad()
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache()) if use_cache else None
        out = model(ids, attention_mask=mask, labels=labels, use_cache=use_cache, cache=cache)
        assert (out.get(CACHE_NAME) is None) == (not use_cache or model.is_gradient_checkpointing)
        out.loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.gradient_checkpointing_enable()
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    assert len(plain) == len(list(model.parameters()))  # every parameter learns, as DDP needs
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


# ===================================================================================================== generation


def test_cached_decoding_equals_the_full_forward(model):
    ids, mask = random_ids(2, 40), length_mask([40, 27], 40)
    decoder_ids = random_ids(2, 8)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        encoded = model.get_encoder()(ids, attention_mask=mask)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        steps = [model(attention_mask=mask, encoder_outputs=encoded, decoder_input_ids=decoder_ids[:, :3],
                       cache=cache, use_cache=True).logits]
        for t in range(3, 8):
            steps.append(model(attention_mask=mask, encoder_outputs=encoded, decoder_input_ids=decoder_ids[:, t:t + 1],
                               cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("settings", [dict(), dict(num_beams=3), dict(num_beams=2, num_return_sequences=2)])
def test_generation_with_the_cache_equals_generation_without(model, settings):
    ids, mask = random_ids(2, 40), length_mask([40, 26], 40)
    common = dict(attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False, **settings)
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **common)
        uncached = model.generate(ids, use_cache=False, **common)
    assert cached.shape == (2 * settings.get("num_return_sequences", 1), 13)
    assert (cached[:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_with_and_without_the_cache(model):
    ids = random_ids(2, 30)
    outputs = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        with torch.no_grad():
            outputs.append(model.generate(ids, max_new_tokens=10, do_sample=True, top_k=50, use_cache=use_cache))
    assert torch.equal(*outputs)


def test_generate_stops_at_eos(model):
    ids = random_ids(1, 20)
    with torch.no_grad():
        first = int(model.generate(ids, max_new_tokens=1, do_sample=False)[0, 1])
        out = model.generate(ids, max_new_tokens=5, do_sample=False, eos_token_id=first)
    assert out.tolist() == [[model.config.decoder_start_token_id, first]]


def test_a_foreign_cache_is_refused(model):
    with pytest.raises(ValueError, match="EncoderDecoderCache"):
        model(random_ids(1, 20), decoder_input_ids=random_ids(1, 2), cache=DynamicCache())


# ===================================================================================================== save and load


def test_auto_model_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    assert type(loaded) is CoLT5ForConditionalGeneration
    assert loaded.decoder.embed_tokens.weight is loaded.model.embed_tokens.weight
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids, mask = random_ids(2, 40), length_mask([40, 26], 40)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=6),
                           loaded.generate(ids, attention_mask=mask, max_new_tokens=6))


def test_encoder_loads_as_colt5_model_and_starts_an_encoder_decoder(model, seq2seq_config, tmp_path):
    """The encoder is the backbone (`model.*`): AutoModel loads it from an encoder-decoder checkpoint, and an
    encoder-decoder starts from a CoLT5Model checkpoint (its decoder fresh)."""
    from transformers import AutoModel

    model.save_pretrained(tmp_path / "seq2seq")
    encoder = AutoModel.from_pretrained(tmp_path / "seq2seq")
    assert type(encoder).__name__ == "CoLT5Model"
    ids, mask = random_ids(2, 30), length_mask([30, 21], 30)
    with torch.no_grad():
        expected = model.get_encoder()(ids, attention_mask=mask).last_hidden_state
        assert torch.equal(encoder(ids, attention_mask=mask).last_hidden_state, expected)

    encoder.save_pretrained(tmp_path / "encoder")
    started = CoLT5ForConditionalGeneration.from_pretrained(tmp_path / "encoder")
    with torch.no_grad():
        assert torch.equal(started.get_encoder()(ids, attention_mask=mask).last_hidden_state, expected)


def test_untied_round_trip_keeps_three_embeddings(seq2seq_config, tmp_path):
    model = CoLT5ForConditionalGeneration(seq2seq_config(tie_word_embeddings=False))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path)
    for name in ("model.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(loaded.state_dict()[name], model.state_dict()[name]), name
    assert not torch.equal(loaded.lm_head.weight, loaded.model.embed_tokens.weight)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["colt5"] = None  # the checkpoint's own code must be used
    import torch
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__name__ == "CoLT5ForConditionalGeneration", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    inputs = torch.load(sys.argv[2])
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=6, num_beams=2)
    torch.save(output, sys.argv[3])
    print("REMOTE OK")
    """
)


def test_load_as_remote_code_without_the_package(model, tmp_path, run_without_package):
    model.save_pretrained(tmp_path / "model")
    inputs = dict(input_ids=random_ids(2, 30), attention_mask=length_mask([30, 19], 30))
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_package(REMOTE_SCRIPT, "model", "inputs.pt", "output.pt")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "output.pt"), model.generate(**inputs, max_new_tokens=6, num_beams=2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA path: Triton router, SDPA's GPU kernels")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_training_step_and_cached_generation(seq2seq_config, dtype):
    model = CoLT5ForConditionalGeneration(seq2seq_config()).cuda()
    ids, mask = random_ids(2, 600).cuda(), length_mask([600, 410], 600).cuda()
    labels = random_ids(2, 12).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        loss = model(ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    model.to(dtype).eval()
    with torch.no_grad():
        common = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, num_beams=2)
        cached = model.generate(ids, use_cache=True, **common)
        uncached = model.generate(ids, use_cache=False, **common)
    if dtype is torch.float32:
        assert torch.equal(cached, uncached)
    else:  # bf16 rounding may break near-ties differently; most tokens still agree
        assert (cached == uncached).float().mean() > 0.5


@pytest.mark.parametrize("fused_kernel", [False, True], ids=["math kernel", "fused kernels allowed"])
def test_multi_query_cross_attention_equals_naive_attention(seq2seq_config, monkeypatch, fused_kernel):
    """The heads folded into one attention call over the shared key/value head, against per-head softmax attention
    written out in float64, with padded input positions."""
    import colt5.modeling_colt5 as modeling

    if fused_kernel:
        monkeypatch.setattr(modeling, "MATH_CROSS_ATTENTION_MAX_SCORES", 0)
    layer = modeling.CoLT5MultiQueryCrossAttention(seq2seq_config(), layer_idx=0).double()
    x, memory = torch.randn(2, 5, 64, dtype=torch.float64), torch.randn(2, 30, 64, dtype=torch.float64)
    valid = length_mask([30, 17], 30).bool()
    out = layer(x, memory, valid[:, None, None, :])

    q = layer.q_proj(x).view(2, 5, 4, 16)
    k, v = layer.kv_proj(memory).chunk(2, dim=-1)
    scores = torch.einsum("bthd,bnd->bhtn", q, k) / 16**0.5
    weights = scores.masked_fill(~valid[:, None, None, :], -torch.inf).softmax(-1)
    expected = layer.o_proj(torch.einsum("bhtn,bnd->bthd", weights, v).reshape(2, 5, 64))
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=1e-10)
