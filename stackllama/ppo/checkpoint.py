"""Atomic PPO checkpoints: adapters + value head, optimizer, loop state, RNG.

Only the trainable tensors are saved (LoRA weights and the value head): the frozen base is
re-loaded from the SFT artifact. Each checkpoint is written into a temporary folder and
renamed into place, then ``latest.json`` is swapped atomically to point at it; a kill at any
moment leaves the previous checkpoint intact and trusted.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.json"


def _trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, step: int, module: torch.nn.Module, optimizer, loop_states: list[dict]) -> Path:
    """Write step ``step`` atomically: the trainable tensors and optimizer (the same
    on every rank) and ``loop_states``, one ``{"loop": ..., "rng": rng_state()}`` per process
    in rank order (a single entry without data parallelism)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = folder / f".{name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(_trainable_state(module), tmp / "trainable.pt")
    torch.save(
        {"optimizer": optimizer.state_dict(), "ranks": loop_states},
        tmp / "state.pt",
    )
    final = folder / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = folder / f".{LATEST}.tmp{os.getpid()}"
    pointer.write_text(json.dumps({"step": step, "path": name}))
    os.replace(pointer, folder / LATEST)
    for old in folder.glob("step-*"):  # keep only the newest
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    folder: Path, module: torch.nn.Module, optimizer, rank: int = 0, world_size: int = 1
) -> dict | None:
    """Restore the newest checkpoint into ``module``/``optimizer`` and this rank's
    RNG state; returns this rank's loop state, or None if there is no checkpoint."""
    pointer = Path(folder) / LATEST
    if not pointer.exists():
        return None
    ckpt = Path(folder) / json.loads(pointer.read_text())["path"]
    weights = torch.load(ckpt / "trainable.pt", map_location="cpu")
    params = dict(module.named_parameters())
    missing = [n for n in weights if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} does not fit this model (unknown tensors: {missing[:3]} ...)")
    with torch.no_grad():
        for n, tensor in weights.items():
            params[n].copy_(tensor.to(params[n].device, params[n].dtype))
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    ranks = state["ranks"]
    if len(ranks) != world_size:
        raise RuntimeError(
            f"checkpoint {ckpt} was written by {len(ranks)} process(es); this job has {world_size}: "
            "resume with the same number of processes, or set ppo.resume=false"
        )
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(ranks[rank]["rng"])
    return ranks[rank]["loop"]
