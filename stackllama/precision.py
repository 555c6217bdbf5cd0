"""Mixed precision: one run-wide setting, ``mixed_precision`` = auto | no | bf16 | fp16.

As in accelerate (whose ``mixed_precision`` this mirrors): weights, optimizer state and
the trained adapters stay in ``model.dtype``; matmuls run in the lower precision under
``torch.autocast``. The Trainer-based stages (sft, rm) get Trainer's ``bf16``/``fp16``
flags, which turn on the same autocast; our own loops (PPO, scoring, generation) enter
``autocast`` themselves.

bf16 on CPU is fast only where the CPU has bf16 instructions (AVX512-BF16 or AMX);
elsewhere it is emulated and several times slower than fp32 (~6x on 2 AVX2 cores). So the
default, ``auto``, resolves once per run (``resolve``, called by ``task.run_task`` before any
stage) to ``bf16`` on a CUDA GPU with bf16 support or a CPU with those instructions, and to
``no`` elsewhere; the run logs the resolved value, writes it to ``run/mixed_precision`` and
keys its artifacts by it. An explicit setting wins; an explicit bf16 on a CPU without bf16
instructions runs with a warning. fp16 autocast needs CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any

import torch

from stackllama.config import MIXED_PRECISION as MODES

RESOLVED = tuple(m for m in MODES if m != "auto")  # what a stage ever runs with

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags /proc/cpuinfo lists for the first CPU (none where it cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU has a native bf16 instruction set (unknown counts as no)."""
    return not cpu_flags().isdisjoint({"avx512_bf16", "amx_bf16"})


def fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively on ``device`` (not emulated)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve(mode: str | None, device: torch.device | str) -> str | None:
    """``auto`` -> ``bf16`` where bf16 is fast on ``device``, else ``no``; other modes unchanged."""
    if mode != "auto":
        return mode
    return "bf16" if fast_bf16(torch.device(device)) else "no"


def run_mode(cfg: Any, stage_override: str | None = None) -> str:
    """The precision a stage runs with: ``stage_override`` (e.g. ``ppo.mixed_precision``) when set,
    else the run-wide ``mixed_precision``, with ``auto`` resolved for ``cfg.device``.

    ``task.run_task`` resolves ``auto`` in the config itself before any stage runs; this also
    resolves it for code that builds a stage without going through the task wrapper.
    """
    mode = stage_override or cfg.mixed_precision
    if mode != "auto":
        return str(mode)
    from stackllama.models.loader import resolve_device

    return str(resolve(mode, resolve_device(str(cfg.device))))


def check(mode: str, device: torch.device) -> None:
    """Fail early on a mode the device cannot run; warn where it runs but slowly."""
    if mode not in RESOLVED:
        raise ValueError(f"mixed_precision={mode!r} is not valid; choose one of: {', '.join(MODES)}")
    if mode == "fp16" and device.type != "cuda":
        raise ValueError("mixed_precision=fp16 needs a CUDA device; on CPU use bf16 or no")
    if mode == "bf16" and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(
            "mixed_precision=bf16 on a CPU without AVX512-BF16/AMX: bf16 matmuls are emulated "
            "and may be slower than mixed_precision=no"
        )
    if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("mixed_precision=bf16: this GPU does not support bfloat16; use fp16 or no")


def autocast(mode: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``mode`` on ``device`` (a no-op context for ``no``)."""
    if mode == "no":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=_DTYPES[mode])


def trainer_mode(cfg: Any, device: torch.device) -> str:
    """The precision of the Trainer-based stages (SFT, RM): ``run_mode``, except that bf16 weights
    (``model.dtype=bfloat16``) on CUDA always train under bf16 autocast, as the Trainer expects
    of a bf16 model; one rule for both stages."""
    mode = run_mode(cfg)
    if mode == "no" and torch.device(device).type == "cuda" and cfg.model.dtype == "bfloat16":
        return "bf16"
    return mode


def trainer_flags(mode: str) -> dict[str, Any]:
    """``TrainingArguments`` flags for ``mode`` (the Trainer enters the autocast itself)."""
    return {"bf16": mode == "bf16", "fp16": mode == "fp16"}


__all__ = [
    "MODES",
    "RESOLVED",
    "autocast",
    "check",
    "cpu_flags",
    "cpu_has_fast_bf16",
    "fast_bf16",
    "resolve",
    "run_mode",
    "trainer_flags",
    "trainer_mode",
]
