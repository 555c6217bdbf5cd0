"""Shared fixtures: composed configs for tests, an isolated artifacts dir, the shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from stackllama.config import register_configs
from stackllama.train import config_dir

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "stackexchange"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
register_configs()


def compose_cfg(overrides: list[str] | None = None) -> DictConfig:
    """Compose the app's config exactly as the CLI would (no Hydra run dir)."""
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose(config_name="config", overrides=list(overrides or []), return_hydra_config=False)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared Stack Exchange dumps not found at {SHARED_DATA}")
    return SHARED_DATA
