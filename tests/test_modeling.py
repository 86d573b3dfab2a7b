"""Tests of the transformers classes: CoLT5Config, CoLT5Model, CoLT5ForSequenceClassification, saving, loading
and loading as remote code."""

import ast
import dataclasses
import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

import colt5
from colt5 import CoLT5Config, CoLT5ForSequenceClassification, CoLT5Model

PACKAGE_DIR = Path(colt5.__file__).parent


def length_mask(lengths, n):
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]).long()


def random_ids(batch, n, vocab_size=300):
    return torch.randint(2, vocab_size, (batch, n))


# ===================================================================================================== config


def test_config_defaults_are_colt5_base():
    config = CoLT5Config()
    assert config.model_type == "colt5"
    assert config.hidden_size == 768
    assert config.num_hidden_layers == 12
    assert config.light_intermediate_size == 1024
    assert config.heavy_intermediate_size == 8192
    assert config.light_num_heads == 4
    assert config.heavy_num_heads == 8
    assert config.light_head_dim == 64 and config.heavy_head_dim == 64
    assert config.routed_ff_tokens == 1 / 16 and isinstance(config.routed_ff_tokens, float)
    assert config.routed_query_tokens == 1 / 16 and isinstance(config.routed_query_tokens, float)
    assert config.routed_kv_tokens == 1 / 8 and isinstance(config.routed_kv_tokens, float)
    assert config.router_eps == 1.0
    assert config.router_fetch_ratio == 9 / 8
    assert config.router_iterations is None
    assert config.router_eps_schedule is None
    assert config.num_kv_routing_sets == 1
    assert config.is_causal is False
    assert config.auto_map == {
        "AutoConfig": "configuration_colt5.CoLT5Config",
        "AutoModel": "modeling_colt5.CoLT5Model",
        "AutoModelForCausalLM": "modeling_colt5.CoLT5ForCausalLM",
        "AutoModelForSequenceClassification": "modeling_colt5.CoLT5ForSequenceClassification",
        "AutoModelForSeq2SeqLM": "modeling_colt5.CoLT5ForConditionalGeneration",
    }


AT_LEAST_ONE = (
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
)

INVALID_CONFIGS = [
    *[({name: 0}, name) for name in AT_LEAST_ONE],
    ({"hidden_size": -4}, "hidden_size"),
    ({"light_head_dim": 15}, "light_head_dim"),
    ({"heavy_head_dim": 17}, "heavy_head_dim"),
    ({"heavy_num_heads": 4, "num_kv_routing_sets": 3}, "num_kv_routing_sets"),
    ({"heavy_num_heads": 6, "num_kv_routing_sets": 4}, "heavy_num_heads"),
    *[({name: value}, name)
      for name in ("routed_ff_tokens", "routed_query_tokens", "routed_kv_tokens")
      for value in (0, -3, 0.0, -0.5, 1.5, 1.0000001)],
    ({"router_eps": 0.0}, "router_eps"),
    ({"router_eps": -1.0}, "router_eps"),
    ({"router_iterations": 0}, "router_iterations"),
    ({"router_iterations": -2}, "router_iterations"),
    ({"router_eps_schedule": [4.0, 0.5]}, "router_eps_schedule"),  # needs router_iterations
    ({"router_iterations": 3, "router_eps_schedule": [4.0]}, "router_eps_schedule"),
    ({"router_iterations": 3, "router_eps_schedule": [4.0, 0.5, 0.1]}, "router_eps_schedule"),
    ({"router_iterations": 3, "router_eps_schedule": [0.0, 0.5]}, "router_eps_schedule"),
    ({"router_iterations": 3, "router_eps_schedule": [4.0, 0.0]}, "router_eps_schedule"),
    ({"router_iterations": 3, "router_eps_schedule": [4.0, 1.5]}, "router_eps_schedule"),
    ({"router_fetch_ratio": 0.5}, "router_fetch_ratio"),
    ({"route_block_size": 0}, "route_block_size"),
    ({"hidden_dropout": 1.0}, "hidden_dropout"),
    ({"hidden_dropout": -0.1}, "hidden_dropout"),
    ({"attention_dropout": 1.0}, "attention_dropout"),
    ({"attention_dropout": -0.1}, "attention_dropout"),
    ({"rope_theta": 0.0}, "rope_theta"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"initializer_range": -0.01}, "initializer_range"),
    ({"pad_token_id": 300}, "pad_token_id"),
    ({"pad_token_id": -1}, "pad_token_id"),
    ({"causal_block_size": 0}, "causal_block_size"),
    ({"causal_router_momentum": 0.0}, "causal_router_momentum"),
    ({"is_causal": True, "routed_query_tokens": 4}, "routed_query_tokens"),
    ({"is_causal": True, "routed_ff_tokens": 4}, "routed_ff_tokens"),
    ({"is_causal": True, "route_block_size": 64}, "route_block_size"),
    ({"is_causal": True, "routed_query_tokens": 1.0, "learned_unrouted_query_output": True},
     "learned_unrouted_query_output"),
]


def test_the_causal_model_makes_every_token_a_heavy_query_by_default(tmp_path):
    """routed_query_tokens=None resolves to the encoder's 1/16 or the causal model's 1.0, and a saved config keeps
    the resolved value; an explicit share is kept as given."""
    causal = CoLT5Config(is_causal=True)
    assert causal.routed_query_tokens == 1.0 and isinstance(causal.routed_query_tokens, float)
    assert CoLT5Config(is_encoder_decoder=True).routed_query_tokens == 1 / 16
    assert CoLT5Config(is_causal=True, routed_query_tokens=0.25).routed_query_tokens == 0.25
    causal.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["routed_query_tokens"] == 1.0
    assert CoLT5Config.from_pretrained(tmp_path).routed_query_tokens == 1.0
    # A causal config saved with a share (as every one before this default) keeps it.
    CoLT5Config(is_causal=True, routed_query_tokens=0.0625).save_pretrained(tmp_path / "share")
    assert CoLT5Config.from_pretrained(tmp_path / "share").routed_query_tokens == 0.0625


@pytest.mark.parametrize(
    "overrides, field", INVALID_CONFIGS, ids=[f"{f}={list(o.values())}" for o, f in INVALID_CONFIGS]
)
def test_config_validation_raises_value_error_naming_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**overrides)


@pytest.mark.parametrize("field", ["routed_ff_tokens", "routed_query_tokens", "routed_kv_tokens"])
@pytest.mark.parametrize("value", [True, False])
def test_config_rejects_bool_routed_amounts(tiny_config, field, value):
    # Rejected either by the strict dataclass type check or by the package's own check; either way it names
    # the field (True must not silently mean "1 token").
    with pytest.raises((ValueError, StrictDataclassFieldValidationError), match=field):
        tiny_config(**{field: value})


@pytest.mark.parametrize("value", [1, 7, 100000, 1.0, 0.5, 1e-3])
@pytest.mark.parametrize("field", ["routed_ff_tokens", "routed_query_tokens", "routed_kv_tokens"])
def test_config_accepts_counts_and_fractions(tiny_config, field, value):
    config = tiny_config(**{field: value})
    assert getattr(config, field) == value
    assert type(getattr(config, field)) is type(value)


def test_config_accepts_valid_router_settings(tiny_config):
    config = tiny_config(router_iterations=4, router_eps_schedule=[8.0, 0.5], router_eps=0.1, route_block_size=16,
                         num_kv_routing_sets=2, router_straight_through=True, router_backend="torch")
    assert config.router_kwargs() == dict(
        fetch_ratio=9 / 8, eps=0.1, n_iters=4, eps_schedule=[8.0, 0.5], straight_through=True, route_block_size=16,
        backend="torch", random_routing=False,
    )


def test_config_round_trip_keeps_every_field(tiny_config, tmp_path):
    config = tiny_config(
        routed_ff_tokens=1.0,  # a fraction (every token), not the count 1
        routed_query_tokens=7,  # a count
        routed_kv_tokens=0.3,
        num_kv_routing_sets=2,
        router_eps=0.25,
        router_iterations=6,
        router_eps_schedule=[4.0, 0.5],
        router_fetch_ratio=1.5,
        router_straight_through=True,
        route_block_size=16,
        multiply_keys_by_score=False,
        multiply_queries_by_score=True,
        learned_unrouted_query_output=True,
        rope_theta=500.0,
        hidden_dropout=0.1,
        attention_dropout=0.05,
        num_labels=5,
    )
    config.save_pretrained(tmp_path)
    for loader in (CoLT5Config.from_pretrained, AutoConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is CoLT5Config
        saved, expected = loaded.to_dict(), config.to_dict()
        saved.pop("_name_or_path"), expected.pop("_name_or_path")
        assert saved == expected
        own_fields = [f.name for f in dataclasses.fields(CoLT5Config) if f.name in CoLT5Config.__annotations__]
        assert "router_eps_schedule" in own_fields and len(own_fields) >= 35
        for name in own_fields:
            assert getattr(loaded, name) == getattr(config, name), name
            assert type(getattr(loaded, name)) is type(getattr(config, name)), name
        assert type(loaded.routed_ff_tokens) is float and loaded.routed_ff_tokens == 1.0
        assert type(loaded.routed_query_tokens) is int and loaded.routed_query_tokens == 7
        assert loaded.routed_kv_tokens == 0.3
        assert loaded.router_eps_schedule == [4.0, 0.5]
        assert loaded.num_labels == 5
        assert loaded.auto_map == config.auto_map


# ===================================================================================================== model


@pytest.fixture
def model(tiny_config):
    return CoLT5Model(tiny_config()).eval()


def test_model_output_shape(model):
    ids = random_ids(2, 50)
    out = model(ids, attention_mask=length_mask([50, 31], 50))
    assert out.last_hidden_state.shape == (2, 50, 64)
    assert torch.isfinite(out.last_hidden_state).all()


def test_model_hidden_states(model):
    ids = random_ids(2, 40)
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 40, 64) for h in out.hidden_states)
    assert torch.equal(out.hidden_states[0], model.embed_tokens(ids))


def test_model_return_dict_false_gives_tuple(model):
    ids = random_ids(2, 40)
    out = model(ids, return_dict=False)
    assert isinstance(out, tuple)
    assert torch.equal(out[0], model(ids).last_hidden_state)


def test_inputs_embeds_equal_input_ids(model):
    ids = random_ids(2, 40)
    mask = length_mask([40, 25], 40)
    with torch.no_grad():
        from_ids = model(ids, attention_mask=mask).last_hidden_state
        from_embeds = model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask).last_hidden_state
    assert torch.equal(from_ids, from_embeds)


@pytest.mark.parametrize("shape", [(2, 39), (1, 40), (2, 40, 1), (40,)])
def test_mismatched_attention_mask_raises(model, shape):
    with pytest.raises(ValueError, match="attention_mask"):
        model(random_ids(2, 40), attention_mask=torch.ones(shape, dtype=torch.long))


def test_both_or_neither_inputs_raise(model):
    ids = random_ids(2, 40)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids, inputs_embeds=model.embed_tokens(ids))
    with pytest.raises(ValueError, match="input_ids"):
        model()


def test_explicit_position_ids_equal_default(model):
    ids = random_ids(2, 40)
    with torch.no_grad():
        explicit = model(ids, position_ids=torch.arange(40).expand(2, 40)).last_hidden_state
        assert torch.equal(explicit, model(ids).last_hidden_state)
        shifted = model(ids, position_ids=torch.arange(40).expand(2, 40) + 7).last_hidden_state
    # Rotary embeddings are relative: a constant shift barely matters, but it does go through.
    torch.testing.assert_close(shifted, explicit, atol=1e-4, rtol=0)
    assert not torch.equal(shifted, explicit)


def test_fully_padded_sample_is_finite(tiny_config):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=3)).train()
    ids = random_ids(2, 30)
    mask = length_mask([30, 0], 30)
    out = model(ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def test_model_padding_invariance(tiny_config):
    model = CoLT5Model(tiny_config(num_kv_routing_sets=2)).eval()
    n = 60
    ids = random_ids(3, n)
    mask = length_mask([n, 41, 17], n)
    changed = ids.clone()
    changed[mask == 0] = random_ids(1, int((mask == 0).sum()))[0]
    with torch.no_grad():
        out = model(ids, attention_mask=mask).last_hidden_state
        out_changed = model(changed, attention_mask=mask).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(out_changed[valid], out[valid], atol=1e-6, rtol=0)


def test_model_padded_sample_equals_sample_alone(model):
    ids = random_ids(2, 80)
    mask = length_mask([80, 55], 80)
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).last_hidden_state
        alone = model(ids[1:, :55]).last_hidden_state
    torch.testing.assert_close(batched[1, :55], alone[0], atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:.*deprecated.*:FutureWarning")
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "causal"])
def test_gradient_checkpointing_gives_same_gradients(tiny_config, causal):
    """Checkpointed layers recompute their forward in the backward pass; the recomputation must route as the
    first pass did (the causal routers' running statistics change in training) and update nothing twice."""
    settings = dict(is_causal=True, routed_kv_tokens=12, causal_block_size=16) if causal else {}
    config = tiny_config(hidden_dropout=0.0, attention_dropout=0.0, **settings)
    reference = CoLT5Model(config)
    checkpointed = CoLT5Model(config)
    checkpointed.load_state_dict(reference.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.is_gradient_checkpointing

    mask = length_mask([48, 30], 48)
    target = torch.randn(2, 48, 64)
    calls = []
    checkpointed.layers[0].attention.register_forward_hook(lambda *_: calls.append(1))
    batches = [random_ids(2, 48) for _ in range(3)]
    for model in (reference, checkpointed):
        model.train()
        for ids in batches:
            model.zero_grad()
            out = model(ids, attention_mask=mask).last_hidden_state
            (out * target).sum().backward()
    # The checkpointed layer ran its forward again during each backward pass.
    assert len(calls) == 2 * len(batches)

    ref_grads = dict(reference.named_parameters())
    for name, param in checkpointed.named_parameters():
        expected = ref_grads[name].grad
        assert param.grad is not None and expected is not None, name
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=0, msg=name)
    reference.eval()
    checkpointed.eval()
    ref_buffers = dict(reference.named_buffers())
    for name, buffer in checkpointed.named_buffers():
        torch.testing.assert_close(buffer, ref_buffers[name], atol=1e-6, rtol=0, msg=name)
    if causal:  # the statistics did move, so a double or skipped update would have shown
        initial = dict(CoLT5Model(config).named_buffers())
        moved = [name for name, buffer in ref_buffers.items() if "threshold" in name and buffer != initial[name]]
        assert moved


# ===================================================================================================== classification


def test_classification_logits_loss_and_backward(tiny_config):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=3)).train()
    ids = random_ids(2, 40)
    mask = length_mask([40, 22], 40)
    labels = torch.tensor([0, 2])
    out = model(ids, attention_mask=mask, labels=labels)
    assert out.logits.shape == (2, 3)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_classification_regression_loss(tiny_config):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=1)).eval()
    ids = random_ids(2, 30)
    labels = torch.tensor([0.5, -1.0])
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 1)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels))


def test_classification_pools_masked_mean(tiny_config):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=4)).eval()
    n = 50
    ids = random_ids(2, n)
    mask = length_mask([n, 27], n)
    changed = ids.clone()
    changed[mask == 0] = random_ids(1, int((mask == 0).sum()))[0]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        logits_changed = model(changed, attention_mask=mask).logits
        hidden = model.model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(logits_changed, logits, atol=1e-6, rtol=0)
    pooled = torch.stack([hidden[0].mean(0), hidden[1, :27].mean(0)])
    torch.testing.assert_close(logits, model.score(pooled), atol=1e-6, rtol=1e-5)


def test_classification_return_dict_false(tiny_config):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=2)).eval()
    ids = random_ids(2, 30)
    out = model(ids, labels=torch.tensor([1, 0]), return_dict=False)
    assert isinstance(out, tuple)
    assert out[0].shape == () and out[1].shape == (2, 2)


# ===================================================================================================== save / load


def _relative_imports(module_file: Path) -> set[str]:
    tree = ast.parse(module_file.read_text())
    return {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
    }


def _code_files_needed() -> set[str]:
    """modeling_colt5.py, configuration_colt5.py and every sibling module they import, transitively."""
    needed, todo = set(), ["modeling_colt5", "configuration_colt5"]
    while todo:
        name = todo.pop()
        if name in needed:
            continue
        needed.add(name)
        todo.extend(_relative_imports(PACKAGE_DIR / f"{name}.py"))
    return {f"{name}.py" for name in needed}


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_save_pretrained_writes_weights_config_and_code(model, tmp_path):
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json"} <= files
    needed = _code_files_needed()
    assert {"modeling_colt5.py", "configuration_colt5.py", "router.py", "soft_topk.py", "rotary.py",
            "routed_attention.py", "routed_block.py", "routed_feedforward.py", "cache_colt5.py",
            "causal_attention.py", "causal_router.py"} <= needed
    assert needed <= files, f"missing code files: {needed - files}"
    for name in needed:
        assert (tmp_path / name).read_text() == (PACKAGE_DIR / name).read_text()

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "colt5"
    assert saved["auto_map"] == {
        "AutoConfig": "configuration_colt5.CoLT5Config",
        "AutoModel": "modeling_colt5.CoLT5Model",
        "AutoModelForCausalLM": "modeling_colt5.CoLT5ForCausalLM",
        "AutoModelForSequenceClassification": "modeling_colt5.CoLT5ForSequenceClassification",
        "AutoModelForSeq2SeqLM": "modeling_colt5.CoLT5ForConditionalGeneration",
    }


def test_auto_model_round_trip_is_exact(tiny_config, tmp_path):
    model = CoLT5Model(tiny_config(num_kv_routing_sets=2, learned_unrouted_query_output=True)).eval()
    with torch.no_grad():  # make every parameter, including the zero-initialised ones, distinctive
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert type(loaded) is CoLT5Model
    assert not loaded.training
    _assert_same_state(model, loaded)

    ids = random_ids(2, 40)
    mask = length_mask([40, 23], 40)
    with torch.no_grad():
        assert torch.equal(
            loaded(ids, attention_mask=mask).last_hidden_state, model(ids, attention_mask=mask).last_hidden_state
        )


def test_auto_classification_round_trip_is_exact(tiny_config, tmp_path):
    model = CoLT5ForSequenceClassification(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert type(loaded) is CoLT5ForSequenceClassification
    _assert_same_state(model, loaded)
    ids = random_ids(2, 40)
    mask = length_mask([40, 23], 40)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_load_in_bfloat16(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = random_ids(2, 40)
    with torch.no_grad():
        out = loaded(ids, attention_mask=length_mask([40, 19], 40)).last_hidden_state
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), model(ids, attention_mask=length_mask([40, 19], 40)).last_hidden_state,
                               atol=0.1, rtol=0.1)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["colt5"] = None  # the package must not be importable: the checkpoint's own code is used
    try:
        import colt5
    except ImportError:
        pass
    else:
        raise SystemExit("colt5 is importable")

    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    model_dir, cls_dir, inputs_file, output_file = sys.argv[1:5]

    # Without trust_remote_code (default or False) the custom code must be refused, not silently run.
    for kwargs in ({}, {"trust_remote_code": False}):
        try:
            AutoModel.from_pretrained(model_dir, **kwargs)
        except ValueError as error:
            assert "trust_remote_code" in str(error), str(error)
        else:
            raise SystemExit(f"loaded without trust_remote_code: {kwargs}")

    model = AutoModel.from_pretrained(model_dir, trust_remote_code=True)
    assert type(model).__name__ == "CoLT5Model", type(model)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model.config).__module__.startswith("transformers_modules"), type(model.config).__module__
    classifier = AutoModelForSequenceClassification.from_pretrained(cls_dir, trust_remote_code=True)
    assert type(classifier).__module__.startswith("transformers_modules"), type(classifier).__module__
    assert "colt5" not in {name.split(".")[0] for name, module in sys.modules.items() if module is not None}

    inputs = torch.load(inputs_file)
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
        logits = classifier(**inputs).logits
    torch.save({"hidden": hidden, "logits": logits}, output_file)
    print("REMOTE OK")
    """
)


def test_load_as_remote_code_without_the_package(tiny_config, tmp_path, run_without_package):
    model = CoLT5Model(tiny_config(num_kv_routing_sets=2)).eval()
    classifier = CoLT5ForSequenceClassification(tiny_config(num_labels=3)).eval()
    model.save_pretrained(tmp_path / "model")
    classifier.save_pretrained(tmp_path / "classifier")
    inputs = dict(input_ids=random_ids(2, 40), attention_mask=length_mask([40, 26], 40))
    torch.save(inputs, tmp_path / "inputs.pt")
    run_without_package(REMOTE_SCRIPT, "model", "classifier", "inputs.pt", "outputs.pt")
    # The checkpoint's code was copied into the fresh modules cache.
    assert any((tmp_path / "hf_home").rglob("modeling_colt5.py"))

    remote = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        assert torch.equal(remote["hidden"], model(**inputs).last_hidden_state)
        assert torch.equal(remote["logits"], classifier(**inputs).logits)


def test_position_ids_broadcast_over_the_batch_or_raise(tiny_config):
    model = CoLT5Model(tiny_config()).eval()
    input_ids = torch.randint(2, 300, (2, 40))
    with torch.no_grad():
        reference = model(input_ids).last_hidden_state
        for position_ids in (torch.arange(40), torch.arange(40).unsqueeze(0), torch.arange(40).expand(2, 40)):
            torch.testing.assert_close(model(input_ids, position_ids=position_ids).last_hidden_state, reference)
        with pytest.raises(ValueError, match="position_ids"):
            model(input_ids, position_ids=torch.arange(39))


def test_16k_token_forward_and_backward_on_cpu():
    # The foundation's size check: 2 layers, hidden 256, the paper's routing fractions, one 16,384-token sequence.
    config = CoLT5Config(
        vocab_size=384, hidden_size=256, num_hidden_layers=2, light_intermediate_size=128, heavy_intermediate_size=1024
    )
    model = CoLT5Model(config)
    input_ids = torch.randint(3, 384, (1, 16384))
    hidden = model(input_ids, attention_mask=torch.ones_like(input_ids)).last_hidden_state
    hidden.pow(2).mean().backward()
    assert hidden.shape == (1, 16384, 256) and torch.isfinite(hidden).all()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
