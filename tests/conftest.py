"""Shared fixtures: composed configs for tests, an isolated artifacts dir, the shared data."""

from __future__ import annotations

import os
import sys
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
    """Compose the app's config as the CLI would (no Hydra run dir).

    Tests pin ``mixed_precision=no`` unless they set it: ``auto`` would resolve to bf16 on some
    CI machines and to fp32 on others, and the figures tests compare must not depend on that.
    """
    overrides = list(overrides or [])
    if not any(o.lstrip("+~").startswith("mixed_precision=") for o in overrides):
        overrides.insert(0, "mixed_precision=no")
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        return compose(config_name="config", overrides=overrides, return_hydra_config=False)


def tiny_reward_folder() -> Path:
    """The tiny random Llama as a 1-label reward model folder, score head saved (built once, cached
    beside the tiny model). A causal-LM folder is refused as a reward model: it has no score head."""
    import torch
    from filelock import FileLock
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stackllama.models.loader import model_folder
    from stackllama.models.resolve import is_complete, mark_complete

    base = model_folder(compose_cfg(["model=tiny"]).model)
    target = base.with_name(base.name + "-reward")
    with FileLock(str(target) + ".lock"):
        if not is_complete(target):
            tok = AutoTokenizer.from_pretrained(str(base))
            with torch.random.fork_rng():
                torch.manual_seed(0)
                model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
            model.config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            tmp = target.with_name(target.name + f".tmp{os.getpid()}")
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            mark_complete(tmp)
            os.replace(tmp, target)
    return target


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared Stack Exchange dumps not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from threads, and on a shared
    2-core box they only wait on each other. Use with ``pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_ppo_cli(tmp_path: Path, *overrides: str) -> list[str]:
    """``python -m stackllama stage=ppo`` on the tiny Llama with explicit policy and reward-model
    folders (no SFT/RM stage first), small batches and responses; ``overrides`` come last."""
    from stackllama.models.loader import model_folder

    return [
        sys.executable,
        "-m",
        "stackllama",
        "stage=ppo",
        "model=tiny",
        "logger=none",
        f"artifacts_dir={tmp_path / 'art'}",
        f"ppo.policy_path={model_folder(compose_cfg(['model=tiny']).model)}",
        f"ppo.reward_model_path={tiny_reward_folder()}",
        "ppo.batch_size=4",
        "ppo.mini_batch_size=2",
        "ppo.min_new_tokens=4",
        "ppo.max_new_tokens=8",
        "data.synthetic.num_questions=60",
        *overrides,
    ]
