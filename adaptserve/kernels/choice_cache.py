"""Saved kernel choices, so the next start on the same GPU is warm without tuning again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from adaptserve.kernels.registry import KernelRegistry, KernelVariant, ShapeBucket

log = logging.getLogger(__name__)


class ChoiceCache:
    """Saved choices: {"<gpu>|<bucket key>": {"variant", "version", "seconds"}} in a JSON file."""

    def __init__(self, path: str | Path, device_name: str):
        self.path = Path(path).expanduser()
        self.device_name = device_name
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.entries = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as error:
                log.warning("ignoring unreadable kernel cache %s: %s", self.path, error)

    def put(self, bucket: ShapeBucket, variant: KernelVariant, seconds: float | None) -> None:
        self.entries[f"{self.device_name}|{bucket.key()}"] = {
            "variant": variant.name,
            "version": variant.version,
            "seconds": seconds,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def load_into(self, registry: KernelRegistry) -> int:
        """Apply this GPU's saved choices whose variant still exists at the same version."""
        loaded = 0
        prefix = f"{self.device_name}|"
        for key, entry in self.entries.items():
            if not key.startswith(prefix):
                continue
            bucket = ShapeBucket.parse(key[len(prefix) :])
            try:
                variant = registry.get(bucket.op, entry["variant"])
            except ValueError:
                continue
            if variant.version == entry.get("version"):
                registry.set_choice(bucket, variant.name, "cache")
                loaded += 1
        return loaded
