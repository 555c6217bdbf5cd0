"""The single Hydra entry point: compose the config, then dispatch to the stage runner.

python -m stackllama stage=ppo ppo.kl_coef=0.1
python -m stackllama -m stage=ppo ppo.kl_coef=0.02,0.1,0.2 seed=0,1
"""

from __future__ import annotations

import os
from pathlib import Path

# Quiet, offline-safe defaults before transformers/wandb import anything.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from stackllama.config import register_configs  # noqa: E402


def config_dir() -> str:
    """conf/ shipped inside the wheel, else the repository's top-level conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parents[1] / "conf")


register_configs()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    from stackllama.task import run_task

    return run_task(cfg)


if __name__ == "__main__":
    main()
