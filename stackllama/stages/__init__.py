"""Stage registry: ``stage=<name>`` picks one runner module, imported only when used."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from stackllama.config import STAGES

Runner = Callable[[Any, Any], "float | None"]


def get_runner(name: str) -> Runner:
    if name not in STAGES:
        raise ValueError(f"stage={name!r} is not a stage; choose one of: {', '.join(STAGES)}")
    module = importlib.import_module(f"stackllama.stages.{name}")
    runner = getattr(module, "run", None)
    if runner is None:
        raise NotImplementedError(f"stage={name} is not implemented yet")
    return runner


def get_builder(name: str) -> Callable[..., dict]:
    """``build(cfg, ctx, inputs, work_dir, out_dir) -> metrics`` of a stage that makes an artifact
    (``inputs``: its upstream models by stage name, resolved by ``stackllama.pipeline``)."""
    module = importlib.import_module(f"stackllama.stages.{name}")
    builder = getattr(module, "build", None)
    if builder is None:
        raise NotImplementedError(f"stage={name} is not implemented yet")
    return builder
