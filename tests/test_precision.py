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
    from stackllama.config import validate_choices

    with pytest.raises(ValueError, match="mixed_precision='fp8' is not valid"):
        validate_choices(compose_cfg(["mixed_precision=fp8"]))


def test_ppo_may_keep_its_own_precision():
    from stackllama.config import validate_choices

    cfg = compose_cfg(["mixed_precision=bf16", "ppo.mixed_precision=no"])
    validate_choices(cfg)
    assert (cfg.ppo.mixed_precision or cfg.mixed_precision) == "no"
    assert compose_cfg(["ppo.mixed_precision=null"]).ppo.mixed_precision is None
    with pytest.raises(ValueError, match="ppo.mixed_precision='fp8' is not valid"):
        validate_choices(compose_cfg(["ppo.mixed_precision=fp8"]))
