"""Where benchmark results go: JSON with device, date and git commit under docs/benchmarks/."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

RESULTS_DIR = Path("docs/benchmarks")
DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (embedded GGUF, Q4_1 dequantized)"  # --model not given


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def device_tag(device: torch.device) -> str:
    """Short file-name tag: 'cpu', 'h100', 'h200', ..."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10"):
        if tag in name:
            return tag
    return "cuda"


def git_commit() -> str:
    """The checkout's short commit (+"-dirty" with uncommitted changes to tracked files). A copy of
    the tree (a remote GPU box, whose .git may be missing or stale) names it in ADAPTSERVE_GIT_COMMIT,
    which wins when set."""
    if os.environ.get("ADAPTSERVE_GIT_COMMIT"):
        return os.environ["ADAPTSERVE_GIT_COMMIT"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def write_results(
    benchmark: str,
    device: torch.device,
    payload: dict[str, Any],
    out_dir: Path = RESULTS_DIR,
    *,
    device_description: str | None = None,
    file_stem: str | None = None,
    command: str | None = None,
) -> Path:
    """Write `<benchmark>-<device tag>.json` (or `<file_stem>.json`) with the run's provenance first.

    `device_description` names the device when it is not this process's (a client benchmarking a
    server elsewhere); `command` is the command line as typed (the CLI passes it)."""
    record = {
        "benchmark": benchmark,
        "device": device_description or device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "command": command or shlex.join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "torch": torch.__version__,
        **payload,
    }
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    path = Path(out_dir) / f"{file_stem or f'{benchmark}-{device_tag(device)}'}.json"
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path
