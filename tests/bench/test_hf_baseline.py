"""transformers models for random presets: the preset's shapes, built in the asked dtype and device."""

import torch

from adaptserve.bench.hf_baseline import TransformersGenerator, transformers_model
from adaptserve.model.loaders import load_checkpoint


def test_random_preset_model_has_the_preset_shapes_dtype_and_device():
    checkpoint = load_checkpoint("tiny")
    arch = checkpoint.arch
    model = transformers_model(checkpoint, torch.bfloat16, "cpu")
    assert len(model.model.layers) == arch.num_layers
    assert model.config.num_key_value_heads == arch.num_kv_heads
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as the preset says
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert not model.training
    weight = model.model.layers[0].mlp.down_proj.weight
    assert 0.005 < weight.float().std().item() < 0.05  # transformers' own init, not empty memory


def test_unknown_variant_is_refused():
    model = transformers_model(load_checkpoint("tiny"), torch.float32)
    try:
        TransformersGenerator(model, "compiled")
    except ValueError as error:
        assert "eager" in str(error)
    else:
        raise AssertionError("expected a ValueError")
