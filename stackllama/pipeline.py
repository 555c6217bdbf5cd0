"""The recipe as a declared graph: each stage's inputs, and one resolver that provides them.

``PIPELINE[stage]`` (``config.PIPELINE``) maps each input of a stage (the artifact of the stage of
that name) to the setting that may name a finished model instead (an explicit path replaces the artifact, and
then nothing upstream of it is built for that input)::

    sft  <- (nothing)
    rm   <- sft (rm.model_path)
    ppo  <- sft (ppo.policy_path), rm (ppo.reward_model_path)
    dpo  <- sft (dpo.policy_path, by default ppo.policy_path)
    eval <- ppo or dpo (eval.policy; eval.policy_path), sft (ppo.policy_path), rm (ppo.reward_model_path)

``resolve(stage, cfg, ctx)`` works out which upstream artifacts are needed (``plan``), finds or
builds each in order through the artifact store, and returns the stage's inputs as paths. Every
stage runner and ``stage=all`` go through it; a stage's ``build(cfg, ctx, inputs, work_dir,
out_dir)`` gets its inputs as arguments and never calls the store itself, so no build is ever
nested inside another and each one starts from ``seed`` on its own.

The artifact keys follow the same graph (``artifacts.key_material``: an explicit path is keyed
by the path, an artifact by its key).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from stackllama import artifacts
from stackllama.config import PIPELINE, POLICY_STAGES

log = logging.getLogger(__name__)

# (stage, folder, manifest, reused, seconds) after each artifact is found or built
OnReady = Callable[[str, Path, dict, bool, float], None]


def edges(stage: str, cfg: Any) -> dict[str, Optional[str]]:
    """``PIPELINE[stage]`` with eval's ``policy`` input named for the stage ``eval.policy`` picks."""
    out = dict(PIPELINE[stage])
    if "policy" in out:
        policy = str(cfg.eval.policy)
        if policy not in POLICY_STAGES:
            raise ValueError(f"eval.policy={policy!r} is not valid; choose one of: {', '.join(POLICY_STAGES)}")
        out = {policy: out.pop("policy"), **out}
    return out


def given(stage: str, name: str, cfg: Any) -> Optional[str]:
    """The path the config names for input ``name`` of ``stage`` (unchecked), or None."""
    setting = edges(stage, cfg)[name]
    value = OmegaConf.select(cfg, setting) if setting else None
    return str(value) if value else None


def explicit(stage: str, name: str, cfg: Any) -> Optional[Path]:
    """The path the config names for input ``name`` of ``stage``, checked, or None."""
    value = given(stage, name, cfg)
    if value is None:
        return None
    setting = edges(stage, cfg)[name]
    path = Path(os.path.expanduser(str(value)))
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{setting}={value}: {path} holds no config.json (not a model folder)")
    return path


def plan(stage: str, cfg: Any) -> list[str]:
    """The artifacts ``stage`` needs built or found, upstream first (explicit paths cut branches)."""
    order: list[str] = []

    def visit(node: str) -> None:
        for name in edges(node, cfg):
            if given(node, name, cfg) is None and name not in order:
                visit(name)
                order.append(name)

    visit(stage)
    return order


def given_paths(stage: str, cfg: Any) -> dict[str, str]:
    """``{setting: path}`` for every explicit model path a ``stage`` job reads (its own inputs' and
    those of the artifacts it would build); the others are replaced by an explicit path upstream."""
    out = {}
    for node in (stage, *plan(stage, cfg)):
        for name, setting in edges(node, cfg).items():
            value = given(node, name, cfg)
            if value is not None and setting is not None:
                out[setting] = value
    return out


def builder(stage: str, inputs: dict[str, Path]) -> artifacts.BuildFn:
    """The store's ``build(cfg, ctx, work_dir, out_dir)`` for ``stage``, its inputs bound."""
    from stackllama.stages import get_builder

    build = get_builder(stage)
    return lambda cfg, ctx, work_dir, out_dir: build(cfg, ctx, inputs, work_dir, out_dir)


def inputs_of(
    stage: str, cfg: Any, given_models: dict[tuple[str, str], Optional[Path]], ready: dict[str, Path]
) -> dict[str, Path]:
    """``stage``'s inputs: the explicit model where one is given, else the artifact built for it."""
    return {name: given_models[(stage, name)] or ready[name] for name in edges(stage, cfg)}


def resolve(stage: str, cfg: Any, ctx: Any, on_ready: Optional[OnReady] = None) -> dict[str, Path]:
    """The inputs of ``stage`` as paths: explicit ones as given, the others found or built in order.

    Records ``upstream/<name>/path`` and ``upstream/<name>/reused`` (and ``/explicit``) for each.
    """
    order = plan(stage, cfg)
    # every explicit path checked before anything is built
    given_models = {(node, name): explicit(node, name, cfg) for node in (stage, *order) for name in edges(node, cfg)}
    ready: dict[str, Path] = {}
    for name in order:
        started = time.time()
        build = builder(name, inputs_of(name, cfg, given_models, ready))
        folder, manifest, reused = artifacts.ensure(name, cfg, ctx, build)
        ready[name] = folder
        ctx.metrics.update({f"upstream/{name}/path": str(folder), f"upstream/{name}/reused": reused})
        if on_ready is not None:
            on_ready(name, folder, manifest, reused, time.time() - started)
    inputs = inputs_of(stage, cfg, given_models, ready)
    for name, path in inputs.items():
        if name not in ready:
            log.info("%s: %s is the explicit model %s", stage, name, path)
            ctx.metrics.update(
                {f"upstream/{name}/path": str(path), f"upstream/{name}/reused": True, f"upstream/{name}/explicit": True}
            )
    return inputs


def run_stage(stage: str, cfg: Any, ctx: Any) -> tuple[Path, dict[str, Any]]:
    """Run ``stage`` as the requested job: its inputs resolved, its artifact built or reused, its metrics recorded."""
    inputs = resolve(stage, cfg, ctx)
    folder, manifest, reused = artifacts.ensure(stage, cfg, ctx, builder(stage, inputs))
    metrics = dict(manifest.get("metrics", {}))
    metrics.update({"artifact/path": str(folder), "artifact/key": folder.name, "artifact/reused": reused})
    ctx.metrics.update(metrics)
    if reused:
        log.info("%s: nothing to do; metrics copied from the artifact's manifest", stage)
    return folder, metrics


__all__ = ["edges", "given", "explicit", "given_paths", "plan", "builder", "inputs_of", "resolve", "run_stage"]
