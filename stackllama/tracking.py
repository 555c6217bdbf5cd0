"""Experiment tracking behind one small interface: W&B, TensorBoard or nothing.

Stage runners log scalars, tables and summaries through ``Tracker``; Trainer-based stages
forward the Trainer's logs through ``TrackerCallback`` (TRL gets ``report_to="none"``)
so every stage logs the same way. W&B goes offline by itself when there is no API key
or the server is unreachable, so a run never hangs on the network.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

log = logging.getLogger(__name__)


def _wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    if not has_key:
        return "offline"
    try:
        with socket.create_connection(("api.wandb.ai", 443), timeout=3):
            return "online"
    except OSError:
        return "offline"


class Tracker:
    """No-op base; also the ``logger=none`` backend."""

    backend = "none"

    def log(self, values: Mapping[str, Any], step: int | None = None) -> None:
        pass

    def log_table(
        self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], step: int | None = None
    ) -> None:
        pass

    def log_image(self, name: str, path: str | Path) -> None:
        pass

    def summary(self, values: Mapping[str, Any]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(
        self,
        cfg: Any,
        run_dir: Path,
        config_dict: dict,
        name: str,
        group: str | None,
        job_type: str,
        tags: Sequence[str] = (),
    ):
        import wandb

        self._wandb = wandb
        mode = _wandb_mode(cfg.mode)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=group,
            job_type=job_type,
            name=name,
            tags=[t[:64] for t in dict.fromkeys([*cfg.tags, *tags])],  # unique, in order; W&B caps tags at 64 chars
            config=config_dict,
            dir=str(run_dir),
            mode=mode,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=60, silent=True, console="off"),
        )
        log.info("W&B run %s (%s mode) in %s", self.run.id, mode, run_dir)

    def log(self, values, step=None):
        self.run.log(dict(values), step=step)

    def log_table(self, name, columns, rows, step=None):
        table = self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        self.run.log({name: table}, step=step)

    def log_image(self, name, path):
        self.run.log({name: self._wandb.Image(str(path))})

    def summary(self, values):
        self.run.summary.update(dict(values))  # one record, not one per key

    def finish(self, exit_code=0):
        # exit_code 1 marks the run failed in W&B (offline: in the .wandb file, shown once synced)
        self.run.finish(exit_code=exit_code)


class TensorBoardTracker(Tracker):
    backend = "tensorboard"

    def __init__(self, run_dir: Path, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", f"```\n{config_yaml}\n```")

    def log(self, values, step=None):
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=step)

    def log_table(self, name, columns, rows, step=None):
        header = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
        body = "".join("| " + " | ".join(str(c).replace("\n", " ") for c in r) + " |\n" for r in rows)
        self.writer.add_text(name, header + body, global_step=step)

    def log_image(self, name, path):
        import numpy as np
        from PIL import Image

        self.writer.add_image(name, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def summary(self, values):
        self.log({f"summary/{k}": v for k, v in values.items()})

    def finish(self, exit_code=0):
        self.writer.close()


def make_tracker(
    cfg: Any,
    run_dir: Path,
    name: str,
    group: str | None,
    tags: Sequence[str] = (),
    extra_config: Mapping[str, Any] | None = None,
) -> Tracker:
    """The configured backend's tracker for one run.

    W&B: one run per job, in ``group`` (the sweep; ``logger.group`` wins when set), job type
    = the stage, the resolved config (plus ``extra_config``, e.g. the job's Hydra overrides)
    as its config, ``logger.tags`` + ``tags`` as tags, files under ``run_dir/wandb``.
    """
    from omegaconf import OmegaConf

    backend = cfg.logger.backend
    if backend == "none":
        return Tracker()
    if backend == "tensorboard":
        return TensorBoardTracker(run_dir, OmegaConf.to_yaml(cfg))
    if backend == "wandb":
        config_dict = OmegaConf.to_container(cfg, resolve=True)
        config_dict.update(dict(extra_config or {}))
        return WandbTracker(
            cfg.logger, run_dir, config_dict, name, cfg.logger.group or group, cfg.stage.name, tags=tags
        )
    raise ValueError(f"logger.backend={backend!r}; choose one of wandb, tensorboard, none")


def trainer_callback(tracker: Tracker, overrides: Callable[[], dict[str, float]] | None = None):
    """A transformers TrainerCallback forwarding Trainer logs to ``tracker``; ``overrides()``
    replaces the values of the keys it returns (those already in the log) first."""
    from transformers import TrainerCallback

    class TrackerCallback(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and overrides is not None:
                logs.update({k: v for k, v in overrides().items() if k in logs})
            if logs:
                values = {}
                for key, value in logs.items():
                    if not isinstance(value, (int, float)):
                        continue
                    if "/" in key:
                        values[key] = value
                    elif key.startswith("eval_"):
                        values["eval/" + key[5:]] = value
                    else:
                        values["train/" + key] = value
                tracker.log(values, step=state.global_step)

    return TrackerCallback()
