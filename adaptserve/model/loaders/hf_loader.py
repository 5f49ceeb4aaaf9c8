"""Load a Hugging Face model folder: config.json, safetensors weights (one file or shards), tokenizer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from adaptserve.model.config import ModelArchConfig
from adaptserve.model.loaders.checkpoint import LoadedCheckpoint, ModelLoadError, check_state_dict
from adaptserve.model.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_STALE_BUFFER = re.compile(
    r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"
)  # saved by old transformers


def load_hf_folder(folder: str | Path, *, progress: bool = True) -> LoadedCheckpoint:
    """Architecture, float32 weights and tokenizer (if it has tokenizer files) of a HF model folder."""
    folder = Path(folder)
    arch = _read_arch(folder)
    state_dict = read_safetensors(_weight_files(folder), progress=progress)
    for name in [n for n in state_dict if _STALE_BUFFER.fullmatch(n)]:
        del state_dict[name]
    if arch.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)  # some checkpoints store the tied copy too
    check_state_dict(arch, state_dict, str(folder))
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = Tokenizer.from_hf_folder(folder) if has_tokenizer else None
    return LoadedCheckpoint(arch=arch, state_dict=state_dict, tokenizer=tokenizer, source=str(folder))


def read_safetensors(files: list[Path], *, progress: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of `files`, converted to float32; duplicate names across shards are an error."""
    state_dict: dict[str, torch.Tensor] = {}
    bar = tqdm(desc=f"Loading {files[0].parent.name}", unit="tensor", disable=not progress)
    try:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
                bar.total = (bar.total or 0) + len(names)
                for name in names:
                    if name in state_dict:
                        raise ModelLoadError(f"{file}: tensor {name!r} is also in another shard")
                    state_dict[name] = f.get_tensor(name).to(torch.float32)
                    bar.update()
    except (SafetensorError, OSError) as e:
        raise ModelLoadError(
            f"{file}: cannot read safetensors file ({e}); is it corrupt or truncated?"
        ) from e
    finally:
        bar.close()
    return state_dict


def _read_arch(folder: Path) -> ModelArchConfig:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{folder}: no config.json; expected a Hugging Face model folder (config.json + *.safetensors)"
        )
    try:
        return ModelArchConfig.from_hf_config(json.loads(config_path.read_text()))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path}: not valid JSON ({e})") from e
    except KeyError as e:
        raise ModelLoadError(f"{config_path}: required field {e} is missing") from e
    except ValueError as e:
        raise ModelLoadError(f"{config_path}: {e}") from e


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards named by the index, or the single model file."""
    index_path = folder / SHARD_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index_path}: not a safetensors index (needs a weight_map): {e}") from e
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelLoadError(f"{folder}: shards named in {SHARD_INDEX} are missing: {', '.join(missing)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise ModelLoadError(
        f"{folder}: no {SINGLE_FILE} or {SHARD_INDEX}; only safetensors weights are supported "
        "(convert pytorch_model.bin with `save_pretrained(..., safe_serialization=True)`)"
    )
