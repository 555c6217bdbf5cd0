"""Stage artifacts keyed by the config that determines them.

Each stage's output lives in ``<artifacts_dir>/<stage>/<key>/`` where ``key`` hashes every
setting that changes the result (model, data, quantization, LoRA, the stage's own settings,
seed) plus the keys of its upstream artifacts. The store finds or builds one artifact
(``ensure``); which artifacts a stage needs, and in what order, is the pipeline's business
(``stackllama/pipeline.py``), so a sweep over PPO settings builds the SFT and RM models once.

Safety: a build runs under a file lock (a second job needing the same artifact waits, then
reuses it); it writes into ``<key>.work/`` (checkpoints live there, so a re-run resumes) and
the finished folder is renamed into place with its ``manifest.json`` last-step-first, so a
crashed build never leaves a folder a later run trusts. Under DDP the ranks of one job build
together and only rank 0 touches the lock and the rename (see ``ensure``).

A finished folder whose weights hold a NaN or inf (a diverged training) is refused: nothing
is published, the build fails naming the file and tensor (``check_finite_weights``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from stackllama import distributed
from stackllama.memory import PeakMemory
from stackllama.metrics import write_json_atomic

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _keyed(node: dict[str, Any], drop: dict[str, Any]) -> dict[str, Any]:
    for name, sub in drop.items():
        if sub is True:
            node.pop(name, None)
        elif isinstance(node.get(name), dict):
            _keyed(node[name], sub)
    return node


def _section(cfg: Any, name: str) -> Any:
    """``cfg[name]`` without the fields its schema declares ``not_in_key`` (stackllama/config.py)."""
    import typing

    from stackllama.config import Config, unkeyed

    node = OmegaConf.to_container(cfg[name], resolve=True)
    return _keyed(node, unkeyed(typing.get_type_hints(Config)[name]))


# The config sections each artifact's key holds besides model, data, quantization, seed and precision.
SECTIONS = {"sft": ("lora", "sft"), "rm": ("rm",), "ppo": ("lora", "ppo"), "dpo": ("lora", "dpo")}


def key_material(stage: str, cfg: Any) -> dict[str, Any]:
    """Everything that determines ``stage``'s output: its settings (the schema's keyed fields) and,
    per input of the pipeline graph (``config.PIPELINE``), the explicit path or the upstream key."""
    from stackllama import precision
    from stackllama.config import PIPELINE

    if stage not in SECTIONS:
        raise ValueError(f"no artifact for stage {stage!r}")
    material: dict[str, Any] = {
        "stage": stage,
        "model": _section(cfg, "model"),
        "data": _section(cfg, "data"),
        "quantization": _section(cfg, "quantization"),
        "seed": int(cfg.seed),
    }
    mixed = precision.run_mode(cfg)
    if mixed != "no":  # absent when off, so fp32 keys stay as they were before the setting
        material["mixed_precision"] = mixed
    for name in SECTIONS[stage]:
        material[name] = _section(cfg, name)
    upstream = {}
    for name, setting in PIPELINE[stage].items():
        given = OmegaConf.select(cfg, setting) if setting else None
        upstream[name] = given or f"{name}:{stage_key(name, cfg)}"
    if upstream:
        material["upstream"] = upstream
    return material


def stage_key(stage: str, cfg: Any) -> str:
    blob = json.dumps(key_material(stage, cfg), sort_keys=True, default=str)
    return f"{cfg.model.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def artifacts_root(cfg: Any) -> Path:
    return Path(os.path.expanduser(str(cfg.artifacts_dir))).resolve()


def stage_dir(stage: str, cfg: Any) -> Path:
    return artifacts_root(cfg) / stage / stage_key(stage, cfg)


def is_trusted(folder: Path) -> bool:
    return (folder / MANIFEST).exists()


def read_manifest(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / MANIFEST).read_text())


BuildFn = Callable[[Any, Any, Path, Path], dict]

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")


class NonFiniteWeights(FloatingPointError):
    """A model about to be published holds NaN or inf values."""


def _tensors(obj: Any, prefix: str = ""):
    """(name, tensor) for every tensor in a (nested) torch.load result."""
    import torch

    if torch.is_tensor(obj):
        yield prefix or "<tensor>", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}[{i}]")


def check_finite_weights(folder: Path, stage: str = "model") -> int:
    """Raise ``NonFiniteWeights`` naming the first tensor with a NaN/inf in ``folder``'s weight files
    (safetensors read one tensor at a time from its mmap; .pt/.bin via ``torch.load(weights_only)``);
    returns the number of tensors checked."""
    import torch
    from safetensors import safe_open

    checked = 0
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)):
        if path.name.endswith(".safetensors"):
            with safe_open(str(path), framework="pt") as fh:
                named = ((name, fh.get_tensor(name)) for name in fh.keys())
                checked += _first_non_finite(named, path, stage)
        else:
            named = _tensors(torch.load(path, map_location="cpu", weights_only=True))
            checked += _first_non_finite(named, path, stage)
    return checked


def _first_non_finite(named: Any, path: Path, stage: str) -> int:
    import torch

    n = 0
    for name, tensor in named:
        n += 1
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeights(
                f"refusing to publish the {stage} artifact: {path.name} tensor {name!r} holds {bad} NaN/inf "
                f"values of {tensor.numel()} (training diverged; lower the stage's learning rate). Nothing was "
                f"published; the build folder is {path.parent}"
            )
    return n


def _lock_for(final: Path, stage: str) -> FileLock:
    """The build lock of ``final``, held on return (waits for another job building it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(final) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("Waiting for another job that is building %s artifact %s ...", stage, final.name)
        lock.acquire()
    return lock


def ensure(stage: str, cfg: Any, ctx: Any, build: BuildFn) -> tuple[Path, dict[str, Any], bool]:
    """Return ``(folder, manifest, reused)`` for ``stage``, building it under a lock if needed.

    ``build(cfg, ctx, work_dir, out_dir)`` trains and writes the finished model into
    ``out_dir`` (a temporary folder) and returns its metrics; ``work_dir`` persists across
    attempts for checkpoints.

    Under DDP (several processes in one job, see ``stackllama.distributed``) every rank
    calls ``ensure`` and they build together: rank 0 alone takes the file lock (waiting for
    another job if needed) and decides build-or-reuse, the others follow its decision; all
    ranks run ``build`` (rank 0 into the real ``out_dir``, the others into a scratch folder
    they delete); rank 0 writes the manifest and renames, then the others return. The
    other ranks never touch the lock, so two jobs cannot deadlock on it.
    """
    final = stage_dir(stage, cfg)
    held: list[FileLock] = []

    def decide() -> str:  # rank 0 (or the only process)
        if is_trusted(final):
            log.info("Reusing %s artifact %s (built earlier with the same config)", stage, final)
            return "reuse"
        lock = _lock_for(final, stage)
        if is_trusted(final):
            lock.release()
            log.info("Reusing %s artifact %s (another job just built it)", stage, final)
            return "reuse"
        held.append(lock)
        return "build"

    try:
        if distributed.on_main(decide, name=f"ensure-{stage}-{final.name}") == "reuse":
            return final, read_manifest(final), True
        dist = distributed.current()
        work = final.with_name(final.name + ".work")
        tmp = work / "final.tmp"
        out = tmp if dist.is_main else work / f"final.tmp.rank{dist.rank}"  # scratch on other ranks
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        started = time.time()
        log.info(
            "Building %s artifact %s%s",
            stage,
            final,
            f" (rank {dist.rank} of {dist.world_size})" if dist.is_distributed else "",
        )
        from transformers import set_seed

        set_seed(int(cfg.seed))  # every build starts from the seed (inputs are resolved before, never nested)
        with PeakMemory() as peak:  # the build's peak RSS (and CUDA memory), kept beside build_seconds
            metrics = build(cfg, ctx, work, out)

        def publish() -> dict[str, Any]:  # rank 0 (or the only process)
            check_finite_weights(tmp, stage)  # a diverged model is never published
            manifest = {
                "stage": stage,
                "key": final.name,
                "config": key_material(stage, cfg),
                "metrics": metrics,
                "build_seconds": round(time.time() - started, 2),
                "memory": peak.metrics(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "run_dir": str(ctx.run_dir),
                "world_size": dist.world_size,
            }
            write_json_atomic(tmp / MANIFEST, manifest)  # the last file written: its presence = complete
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            return manifest

        manifest = distributed.on_main(publish, name=f"publish-{stage}-{final.name}")
        if not dist.is_main:
            shutil.rmtree(out, ignore_errors=True)
        return final, manifest, False
    finally:
        for lock in held:
            lock.release()
