"""ppo.offload_ref_reward: frozen models out of memory between uses, bit for bit the same run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackllama.config import ConfigError, validate
from stackllama.data.prompts import PromptSource
from stackllama.models.loader import load_model, load_tokenizer, model_folder
from stackllama.models.offload import Offloaded
from stackllama.ppo.trainer import PPOTrainer
from stackllama.reward import RewardScorer
from stackllama.stages.ppo import load_policy, offload_frozen
from tests.conftest import compose_cfg, tiny_reward_folder
from tests.test_ppo import QUESTIONS
from tests.test_ppo_options import QUERIES
from tests.test_ppo_options import _cfg as ppo_cfg

CPU = torch.device("cpu")


def _frozen_tiny():
    cfg = compose_cfg(["model=tiny"])
    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder)
    model = load_model(folder, "causal_lm", cfg.quantization, None, "float32", CPU, tok, trainable=False)
    return model, tok


def test_offloaded_weights_leave_and_come_back_bit_for_bit(tmp_path):
    model, tok = _frozen_tiny()
    ids = torch.tensor([tok("How do I keep my stout from tasting sour?")["input_ids"]])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    off = Offloaded(model, tmp_path, "reference")
    assert off.nbytes == sum(t.numel() * 4 for t in before.values())  # tied embeddings: counted once
    assert all(p.numel() == 0 for p in model.parameters())  # released: nothing held
    with off.resident():
        with off.resident():  # nested: only the outer block loads and releases
            pass
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, logits)
    assert all(p.numel() == 0 for p in model.parameters())


def test_offload_refuses_trainable_or_quantized_models(tmp_path):
    import bitsandbytes as bnb

    model, _ = _frozen_tiny()
    next(model.parameters()).requires_grad_(True)
    with pytest.raises(ValueError, match="trainable"):
        Offloaded(model, tmp_path)
    int8 = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).requires_grad_(False)
    with pytest.raises(ValueError, match="quantization.mode=none"):
        Offloaded(int8, tmp_path)


def test_offload_with_a_quantized_base_is_refused_before_any_model_loads():
    cfg = compose_cfg(["model=tiny", "quantization=int8", "ppo.offload_ref_reward=true"])
    with pytest.raises(ConfigError, match="ppo.offload_ref_reward"):
        validate(cfg)


def _full_ft_history(tmp_path: Path, offload: bool) -> tuple[list[dict], PPOTrainer]:
    cfg = ppo_cfg("lora=none", "ppo.total_episodes=16", "ppo.learning_rate=1e-3", f"ppo.offload_ref_reward={offload}")
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    reward = RewardScorer.from_pretrained(tiny_reward_folder(), batch_size=8, max_length=64)
    score, _ = offload_frozen(cfg, policy, reward, tmp_path / "offload")
    prompts = PromptSource(QUESTIONS, QUERIES, tok, 64, 0)
    trainer = PPOTrainer(cfg.ppo, policy, tok, score, prompts, CPU, 0, tmp_path / "ckpt")
    return trainer.train(), trainer


def test_full_fine_tuning_with_offloaded_reference_and_reward_model_is_the_same_run(tmp_path):
    """Two PPO steps of full fine-tuning with a real reward model: every logged figure equal, while
    between steps the reference copy and the reward model hold no weights."""
    plain, _ = _full_ft_history(tmp_path / "plain", offload=False)
    offloaded, trainer = _full_ft_history(tmp_path / "off", offload=True)
    reference = trainer.policy.reference
    assert trainer.policy.reference_offload is not None and all(p.numel() == 0 for p in reference.parameters())
    assert (tmp_path / "off" / "offload" / "reward_model.safetensors").is_file()
    assert len(plain) == len(offloaded) == 2
    assert plain[-1]["objective/kl"] != 0.0  # the policy has moved off the reference: the KL reads it
    for step_plain, step_off in zip(plain, offloaded):
        for key, value in step_plain.items():
            if not key.startswith("time/"):
                assert step_off[key] == value, key


def test_the_stage_reports_the_offloaded_reference_s_parameters_too(tmp_path):
    """stage=ppo with offloading: params/total counts the reference copy as without offloading (its
    tensors are empty between passes; counted after offloading, it was half)."""
    import json
    import subprocess

    from stackllama.models.loader import count_parameters
    from tests.conftest import REPO, tiny_ppo_cli

    folder = model_folder(compose_cfg(["model=tiny"]).model)
    cmd = tiny_ppo_cli(
        tmp_path,
        "lora=none",
        "ppo.total_episodes=4",
        "ppo.offload_ref_reward=true",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    policy, _ = load_policy(ppo_cfg("lora=none"), folder, CPU)
    assert metrics["params/total"] == count_parameters(policy)["params/total"]
    assert not list((tmp_path / "art" / "ppo").glob("*.work/offload"))  # the copies are gone after the run
