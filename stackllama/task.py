"""Task wrapper around every stage run.

Opens the tracker and ``metrics.json``, validates every setting (``stackllama.config.validate``)
and checks the models the job will need (``stackllama.preflight``) before anything loads,
joins the job's process group when it has several processes (``stackllama.distributed``),
seeds, runs the stage, and always closes the tracker with an exit code (1 on an exception,
so the W&B run shows as failed). In a multirun a failing job records its error in
``metrics.json``, returns NaN (None under Optuna, which then marks the trial FAIL) and the
sweep goes on; a single run re-raises (so does a multirun job with
``+extra.continue_on_failure=false``).

SIGTERM (Slurm preemption or time limit, ``kill``) and Ctrl-C (SIGINT) end the run as
``run/status: interrupted`` with ``run/signal`` in ``metrics.json``, close the tracker with
the conventional exit code 128 + signal number (143, 130) and exit with it, in a multirun
too (the sweep stops: its remaining jobs would be preempted as well). Checkpoints stay, so
the same command resumes.

With several processes (DDP) only rank 0 writes ``metrics.json``, the resolved config and
the tracker; rank ``r`` keeps its figures in ``rank<r>/metrics.json`` of the same run dir.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stackllama import distributed, precision, preflight
from stackllama.config import ConfigError, validate
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


@dataclass
class JobInfo:
    """Where this job sits: its run dir, and in a multirun its sweep (the W&B group)."""

    run_dir: Path
    multirun: bool
    group: str | None
    name: str
    tags: list[str]
    overrides: list[str]
    num: int | None = None
    # What a failed multirun job returns. NaN, except under the Optuna sweeper: with optuna 2.x
    # it tells a NaN as COMPLETE (refused), then retries as FAIL with the NaN still attached and
    # crashes the whole sweep; a None becomes a clean FAIL trial and the study goes on.
    failed_value: float | None = float("nan")


def seed_everything(seed: int) -> None:
    from transformers import set_seed

    set_seed(int(seed))


def _hydra_info(cfg: Any = None) -> JobInfo:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    choices = dict(hc.runtime.choices)
    sweep_choice = choices.get("sweep")
    sweep_choice = None if sweep_choice in (None, "null", "None") else sweep_choice
    group = None
    tags: list[str] = []
    if multirun:
        sweep_dir = Path(hc.sweep.dir)
        # multirun_sweeps/<date>/<time>: one group per sweep (named after the ready sweep if any)
        group = f"{sweep_dir.parent.name}_{sweep_dir.name}"
        if sweep_choice:
            group = f"{sweep_choice}-{group}"
        tags.append("multirun")
        launcher = choices.get("hydra/launcher")
        sweeper = choices.get("hydra/sweeper")
        tags += [f"launcher:{launcher}"] if launcher else []
        tags += [f"sweeper:{sweeper}"] if sweeper else []
    if sweep_choice:
        tags.append(f"sweep:{sweep_choice}")
    if cfg is not None:
        tags.append(f"model:{cfg.model.name}")
    stage = cfg.stage.name if cfg is not None else hc.job.name
    name = run_dir.name if multirun else f"{stage}-{run_dir.name}"
    num = hc.job.get("num") if multirun else None
    optuna = "optuna" in str(OmegaConf.select(hc, "sweeper._target_", default="")).lower()
    return JobInfo(
        run_dir, multirun, group, name[:128], tags, list(hc.overrides.task), num, None if optuna else float("nan")
    )


def resolve_precision(cfg: DictConfig, device: torch.device) -> None:
    """Replace ``auto`` by what this device runs fast, in place, before any key is derived.

    The artifact keys then hold the resolved value: a bf16 model built on one machine is
    never reused by an fp32 run on another. Explicit settings are only checked.
    """
    for key in ("mixed_precision", "ppo.mixed_precision"):
        requested = OmegaConf.select(cfg, key)
        if requested is None:  # ppo.mixed_precision=null: the run-wide setting
            continue
        resolved = precision.resolve(requested, device)
        precision.check(resolved, device)
        if requested == "auto":
            log.info(
                "%s=auto -> %s (%s)",
                key,
                resolved,
                "bf16 runs natively on this %s" % device.type
                if resolved == "bf16"
                else f"no native bf16 on this {device.type}: full precision",
            )
            OmegaConf.update(cfg, key, resolved)


def _numeric_or_text(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str, bool))}


class Interrupted(BaseException):
    """A termination signal arrived: a BaseException, so the stages' ``except Exception``
    handlers let it through, as they do KeyboardInterrupt."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")


class _TerminationSignals:
    """Turn SIGTERM into ``Interrupted`` while a task runs (SIGINT already raises KeyboardInterrupt).

    Installed only in the main thread (Python allows no other) and restored afterwards. Only
    the first signal raises: a second one (Slurm repeats SIGTERM before its SIGKILL) must not
    interrupt the cleanup that records the first.
    """

    def __init__(self) -> None:
        self.previous: Any = None
        self.fired = False

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.fired:
            self.fired = True
            raise Interrupted(signum)

    def __enter__(self) -> "_TerminationSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run_task(cfg: DictConfig) -> float | None:
    """Run the configured stage; returns the sweep objective (None when the stage has none)."""
    with _TerminationSignals():
        return _run_task(cfg)


def _run_task(cfg: DictConfig) -> float | None:
    from stackllama.models.loader import resolve_device
    from stackllama.stages import get_runner

    job = _hydra_info(cfg)
    topology = distributed.detect()  # environment only; the group is joined below
    main = topology.is_main
    metrics_path = job.run_dir / ("metrics.json" if main else f"rank{topology.rank}/metrics.json")
    metrics = Metrics(metrics_path)
    metrics.update(
        {
            "run/stage": cfg.stage.name,
            "run/status": "running",
            "run/seed": cfg.seed,
            "run/world_size": topology.world_size,
        }
    )
    tracker: Tracker = Tracker()
    started = time.time()
    exit_code = 1
    try:
        if main:  # opened first, so a job failing on its config still leaves a failed run
            extra = {"hydra": {"overrides": job.overrides, "job_num": job.num, "run_dir": str(job.run_dir)}}
            tracker = make_tracker(
                cfg,
                job.run_dir,
                cfg.run_name or job.name,
                job.group,
                tags=[cfg.stage.name, *job.tags],
                extra_config=extra,
            )
        validate(cfg)  # every setting, before anything loads
        runner = get_runner(cfg.stage.name)  # fails early for unknown / unbuilt stages
        preflight.check(cfg)  # the models this job needs exist and are models (reads configs/headers only)
        topology = distributed.setup(cfg.device, stage=cfg.stage.name)
        device = resolve_device(cfg.device)
        if device.type == "cuda" and topology.is_distributed:
            device = torch.device("cuda", topology.local_rank)
        resolve_precision(cfg, device)
        metrics.update({"run/mixed_precision": cfg.mixed_precision, "run/device": str(device)})
        seed_everything(cfg.seed)
        ctx = RunContext(job.run_dir, metrics, tracker, device, job.multirun)
        objective = runner(cfg, ctx)
        if cfg.objective:
            if cfg.objective not in metrics.values:
                raise KeyError(f"objective={cfg.objective!r} is not a key of this run's metrics.json")
            objective = metrics.values[cfg.objective]
        if isinstance(objective, str):  # metrics.json keeps NaN/inf as strings
            objective = float(objective)
        exit_code = 0
        metrics.update({"run/status": "completed", "run/objective": objective})
        return objective
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else int(signal.SIGINT)
        name = signal.Signals(signum).name
        exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for Ctrl-C
        metrics.update(
            {
                "run/status": "interrupted",
                "run/signal": name,
                "run/error": f"{name} (re-run the same command to resume)",
            }
        )
        log.error("Stage %s interrupted by %s; checkpoints are kept, the same command resumes", cfg.stage.name, name)
        if isinstance(exc, KeyboardInterrupt):
            raise  # Python exits with 130 itself
        raise SystemExit(exit_code) from None
    except Exception as exc:
        metrics.update({"run/status": "failed", "run/error": f"{type(exc).__name__}: {exc}"})
        if isinstance(exc, ConfigError):  # the message says it all; no traceback to read through
            log.error("Stage %s not started: %s", cfg.stage.name, exc)
        else:
            log.error("Stage %s failed:\n%s", cfg.stage.name, traceback.format_exc())
        if job.multirun and cfg.extra.get("continue_on_failure", True):
            return job.failed_value  # the sweep goes on; metrics.json says what failed
        raise
    finally:
        metrics.update({"time/total_s": round(time.time() - started, 3)})
        try:
            tracker.summary(_numeric_or_text(metrics.values))
        finally:
            tracker.finish(exit_code=exit_code)
        if main:
            OmegaConf.save(cfg, job.run_dir / "resolved_config.yaml", resolve=True)


__all__ = ["Interrupted", "RunContext", "run_task", "seed_everything"]
