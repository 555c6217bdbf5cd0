"""metrics.json: the flat, `/`-keyed record every run leaves in its Hydra run dir.

Tests, sweeps, reports and people read it, so it is rewritten atomically (temp file +
rename) on every flush: a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_json_atomic(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


class Metrics:
    """A flat dict of run-level figures, flushed to ``<run_dir>/metrics.json``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.values: dict[str, Any] = {}

    def update(self, values: Mapping[str, Any], flush: bool = True) -> None:
        for key, value in values.items():
            self.values[key] = _plain(value)
        if flush:
            self.flush()

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def flush(self) -> None:
        write_json_atomic(self.path, self.values)


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "metrics.json").read_text())
