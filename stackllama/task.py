"""Task wrapper around every stage run.

Validates the config, seeds, opens the tracker and ``metrics.json``, runs the stage, and
always closes the tracker (marking the run failed on an exception), so that one failing
job in a sweep leaves a closed, failed run and the sweep goes on.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stackllama.config import validate_choices
from stackllama.metrics import Metrics
from stackllama.tracking import Tracker, make_tracker

log = logging.getLogger("stackllama")


@dataclass
class RunContext:
    """What a stage runner gets besides the config."""

    run_dir: Path
    metrics: Metrics
    tracker: Tracker
    device: torch.device
    multirun: bool = False


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(int(seed))


def _hydra_info() -> tuple[Path, bool, str | None, str]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    if multirun:
        group = f"{Path(hc.sweep.dir).parent.name}_{Path(hc.sweep.dir).name}"
    name = f"{hc.job.name}-{run_dir.name}"
    return run_dir, multirun, group, name


def run_task(cfg: DictConfig) -> float | None:
    """Run the configured stage; returns the sweep objective (None when the stage has none)."""
    from stackllama.models.loader import resolve_device
    from stackllama.stages import get_runner

    validate_choices(cfg)
    runner = get_runner(cfg.stage.name)  # fails early for unknown / unbuilt stages
    run_dir, multirun, group, name = _hydra_info()
    metrics = Metrics(run_dir / "metrics.json")
    metrics.update({"run/stage": cfg.stage.name, "run/status": "running", "run/seed": cfg.seed})
    seed_everything(cfg.seed)
    tracker: Tracker = Tracker()
    started = time.time()
    exit_code = 1
    try:
        tracker = make_tracker(cfg, run_dir, cfg.run_name or name, group)
        ctx = RunContext(run_dir, metrics, tracker, resolve_device(cfg.device), multirun)
        objective = runner(cfg, ctx)
        if cfg.objective:
            if cfg.objective not in metrics.values:
                raise KeyError(f"objective={cfg.objective!r} is not a key of this run's metrics.json")
            objective = metrics.values[cfg.objective]
        exit_code = 0
        metrics.update({"run/status": "completed", "run/objective": objective})
        return objective
    except Exception as exc:
        metrics.update({"run/status": "failed", "run/error": f"{type(exc).__name__}: {exc}"})
        log.error("Stage %s failed:\n%s", cfg.stage.name, traceback.format_exc())
        if multirun and cfg.extra.get("continue_on_failure", True):
            return float("nan")  # the sweep goes on; metrics.json says what failed
        raise
    finally:
        metrics.update({"time/total_s": round(time.time() - started, 3)})
        tracker.summary({k: v for k, v in metrics.values.items() if isinstance(v, (int, float))})
        tracker.finish(exit_code=exit_code)
        OmegaConf.save(cfg, run_dir / "resolved_config.yaml", resolve=True)
