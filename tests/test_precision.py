"""Mixed-precision setting: early errors, the autocast context, Trainer flags."""

from __future__ import annotations

import pytest
import torch

from stackllama import precision
from tests.conftest import compose_cfg

CPU = torch.device("cpu")


def test_fp16_on_cpu_and_unknown_modes_fail_early():
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        precision.check("fp16", CPU)
    with pytest.raises(ValueError, match="choose one of"):
        precision.check("fp8", CPU)
    precision.check("no", CPU)
    precision.check("bf16", CPU)  # runs everywhere (slowly where the CPU has no bf16 instructions)


def test_autocast_context_and_trainer_flags():
    x = torch.randn(4, 8)
    w = torch.randn(8, 8)
    with precision.autocast("no", CPU):
        assert (x @ w).dtype == torch.float32
    with precision.autocast("bf16", CPU):
        assert (x @ w).dtype == torch.bfloat16
    assert precision.trainer_flags("bf16") == {"bf16": True, "fp16": False}
    assert precision.trainer_flags("no") == {"bf16": False, "fp16": False}


def test_config_rejects_an_unknown_mixed_precision():
    from stackllama.config import validate

    with pytest.raises(ValueError, match="mixed_precision='fp8' is not valid"):
        validate(compose_cfg(["mixed_precision=fp8"]))


def test_ppo_may_keep_its_own_precision():
    from stackllama.config import validate

    cfg = compose_cfg(["mixed_precision=bf16", "ppo.mixed_precision=no"])
    validate(cfg)
    assert precision.run_mode(cfg, cfg.ppo.mixed_precision) == "no"  # what stages/ppo.py runs with
    assert precision.run_mode(cfg) == "bf16"
    assert compose_cfg(["ppo.mixed_precision=null"]).ppo.mixed_precision is None
    with pytest.raises(ValueError, match="ppo.mixed_precision='fp8' is not valid"):
        validate(compose_cfg(["ppo.mixed_precision=fp8"]))


@pytest.mark.parametrize("stage", ["sft", "rm"])
def test_bf16_weights_on_cuda_train_under_bf16_in_sft_and_in_rm(stage, monkeypatch, tmp_path):
    """model.dtype=bfloat16 on CUDA: both Trainer-based stages ask the Trainer for bf16 (the RM
    once did not). The Trainer arguments are captured, not built: there is no GPU here."""
    from types import SimpleNamespace

    import trl

    from stackllama.stages import rm, sft

    captured: dict = {}
    monkeypatch.setattr(trl, "SFTConfig", lambda **kw: captured.update(kw))
    monkeypatch.setattr(trl, "RewardConfig", lambda **kw: captured.update(kw))
    cfg = compose_cfg(["model=tiny", "model.dtype=bfloat16", "mixed_precision=no"])

    def flags(device: str) -> tuple[bool, bool]:
        captured.clear()
        ctx = SimpleNamespace(device=torch.device(device))
        if stage == "sft":
            sft.training_args(cfg, ctx, tmp_path)
        else:
            rm.reward_config(cfg, ctx, tmp_path)
        return captured["bf16"], captured["fp16"]

    assert flags("cuda") == (True, False)
    assert flags("cpu") == (False, False)  # on CPU the explicit setting stands
