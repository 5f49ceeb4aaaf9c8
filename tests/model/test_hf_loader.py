"""The HF folder loader against tiny random transformers models saved as sharded safetensors."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from adaptserve.model.loaders import LoadedCheckpoint, ModelLoadError, default_model_path, load_checkpoint
from adaptserve.model.tokenizer import Tokenizer

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=5000.0,
    bos_token_id=1,
    eos_token_id=2,
)

MODELS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(head_dim=32, tie_word_embeddings=True),
    ),
}


def _save_tiny_model(name: str, folder, dtype=torch.float32) -> dict[str, torch.Tensor]:
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    model = model_cls(config_cls(**_COMMON, **extra)).to(dtype)
    with torch.no_grad():  # random norms and biases, so a mix-up between tensors cannot go unnoticed
        for param in model.parameters():
            if param.dim() == 1:
                param.copy_(torch.randn_like(param))
    model.save_pretrained(folder, max_shard_size="100KB")
    return {k: v.float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(MODELS))
def test_sharded_folder_loads_exact_tensors(name, tmp_path):
    expected = _save_tiny_model(name, tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1

    checkpoint = load_checkpoint(str(tmp_path), progress=False)

    assert isinstance(checkpoint, LoadedCheckpoint)
    arch = checkpoint.arch
    assert arch.architecture == name
    assert (arch.vocab_size, arch.hidden_size, arch.num_layers) == (320, 64, 2)
    assert (arch.num_heads, arch.num_kv_heads, arch.intermediate_size) == (4, 2, 96)
    assert arch.head_dim == (32 if name == "qwen3" else 16)
    assert arch.rope_theta == 5000.0 and arch.rms_norm_eps == 1e-6
    assert arch.attention_bias == (name == "qwen2")
    assert arch.qk_norm == (name == "qwen3")
    assert arch.tie_word_embeddings == (name != "llama")
    assert arch.eos_token_ids == [2]
    assert checkpoint.tokenizer is None  # no tokenizer files were saved

    state_dict = checkpoint.state_dict
    if arch.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    assert sorted(state_dict) == sorted(expected)
    for key, tensor in expected.items():
        assert state_dict[key].dtype == torch.float32, key
        assert torch.equal(state_dict[key], tensor), key
    assert any(".q_proj.bias" in k for k in state_dict) == (name == "qwen2")
    assert any(".q_norm." in k for k in state_dict) == (name == "qwen3")


def test_single_file_bf16_is_converted_to_float32(tmp_path):
    config_cls, model_cls, extra = MODELS["llama"]
    model = model_cls(config_cls(**_COMMON, **extra)).to(torch.bfloat16)
    model.save_pretrained(tmp_path)  # one model.safetensors
    assert (tmp_path / "model.safetensors").is_file()

    state_dict = load_checkpoint(str(tmp_path), progress=False).state_dict

    for key, tensor in model.state_dict().items():
        assert state_dict[key].dtype == torch.float32
        assert torch.equal(state_dict[key], tensor.float()), key


def test_folder_with_tokenizer_files_gets_a_tokenizer(tmp_path):
    _save_tiny_model("llama", tmp_path)
    gguf_tokenizer = Tokenizer.from_gguf(default_model_path())
    gguf_tokenizer.hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))

    tokenizer = load_checkpoint(str(tmp_path), progress=False).tokenizer

    assert tokenizer is not None
    text = "Hello there, 42 café <|im_start|>user"
    assert tokenizer.encode(text) == gguf_tokenizer.encode(text)
    assert tokenizer.eos_token_ids == [2, 0]


def test_missing_tensor_is_reported_by_name(tmp_path):
    _save_tiny_model("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights only have 2 layers
    (tmp_path / "config.json").write_text(json.dumps(config))

    with pytest.raises(ModelLoadError, match=r"missing.*model\.layers\.2\."):
        load_checkpoint(str(tmp_path), progress=False)


def test_unknown_path_names_the_spec_and_the_presets(tmp_path):
    spec = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(spec)
    assert spec in str(info.value)
    assert "tiny" in str(info.value)  # lists the preset names


def test_folder_without_config_or_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_checkpoint(str(tmp_path))
    _save_tiny_model("llama", tmp_path)
    for shard in tmp_path.glob("model-*.safetensors"):
        shard.unlink()
    with pytest.raises(ModelLoadError, match="shards .* missing"):
        load_checkpoint(str(tmp_path))


def test_preset_has_no_weights():
    checkpoint = load_checkpoint("tiny")
    assert checkpoint.state_dict is None and checkpoint.tokenizer is None
    assert checkpoint.arch.hidden_size == 64 and checkpoint.source == "tiny"
