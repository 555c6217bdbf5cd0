"""stage=dpo: TRL's DPOTrainer on the reward split's pairs, from the SFT model (tiny random Llama)."""

from __future__ import annotations

import math
from pathlib import Path

import datasets
import pytest
import torch

from stackllama.models.loader import load_tokenizer, model_folder
from stackllama.stages import dpo
from tests.conftest import compose_cfg

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


def _tokenizer():
    return load_tokenizer(model_folder(compose_cfg(["model=tiny"]).model), padding_side="right")


def test_preference_rows_split_prompt_and_answer_on_a_token_boundary_and_drop_long_pairs():
    """prompt + chosen is the SFT text, the prompt ends at "Answer:" (its trailing space starts the
    answer, so TRL's prompt tokens are a prefix of the text's); pairs longer than max_length are
    left out and counted, never truncated."""
    tok = _tokenizer()
    pairs = datasets.Dataset.from_dict(
        {"question": ["Why brew?", "Why boil?"], "chosen": ["Taste.", "word " * 200], "rejected": ["Dunno.", "No."]}
    )
    cols, dropped = dpo.preference_rows(pairs, tok, TEMPLATE, max_length=64)
    assert dropped == 1 and len(cols["prompt"]) == 1
    assert cols["prompt"][0] + cols["chosen"][0] == TEMPLATE.format(question="Why brew?", answer="Taste.")
    assert cols["prompt"][0].endswith("Answer:") and cols["rejected"][0] == " Dunno."
    prompt_ids = tok(cols["prompt"][0], add_special_tokens=False)["input_ids"]
    full_ids = tok(cols["prompt"][0] + cols["chosen"][0], add_special_tokens=False)["input_ids"]
    assert full_ids[: len(prompt_ids)] == prompt_ids


def _ctx(run_dir: Path):
    from stackllama.metrics import Metrics
    from stackllama.task import RunContext
    from stackllama.tracking import Tracker

    return RunContext(run_dir, Metrics(run_dir / "metrics.json"), Tracker(), torch.device("cpu"))


@pytest.mark.usefixtures("one_thread")
def test_dpo_learns_to_prefer_the_chosen_answers(tmp_path):
    """Full fine-tuning of the tiny model on 8 pairs at a high rate: the DPO loss falls from
    log 2 (the policy equals its reference at the start) and the implicit reward
    beta * log(pi / pi_ref) ranks the chosen answer above the rejected one on the training pairs."""
    cfg = compose_cfg(
        [
            "model=tiny",
            "lora=none",
            "mixed_precision=no",
            "data.synthetic.num_questions=60",
            "dpo.max_train_pairs=8",
            "dpo.max_steps=12",
            "dpo.batch_size=4",
            "dpo.gradient_accumulation_steps=1",
            "dpo.learning_rate=1e-3",
            "dpo.warmup_steps=0",
            "dpo.lr_scheduler_type=constant",
            "dpo.max_length=128",
            "dpo.max_eval_pairs=4",
            "dpo.logging_steps=4",
        ]
    )
    out = tmp_path / "out"
    out.mkdir()
    metrics = dpo.build(cfg, _ctx(tmp_path), {"sft": model_folder(cfg.model)}, tmp_path / "work", out)
    assert metrics["train/steps"] == 12 and 0 < metrics["data/dpo_train_pairs"] <= 8  # longer pairs dropped
    assert metrics["train/loss_final"] < 0.5 * math.log(2), metrics["train/loss_final"]
    assert metrics["train/implicit_reward_accuracy"] == 1.0 and metrics["train/implicit_reward_margin"] > 0
    assert math.isfinite(metrics["eval/implicit_reward_accuracy"])
    assert (out / "config.json").exists() and not (out / "adapter_config.json").exists()  # a plain model


def test_dpo_settings_are_validated_before_anything_loads():
    from stackllama.config import ConfigError, validate

    with pytest.raises(ConfigError, match="dpo.loss_type='kto' is not valid"):
        validate(compose_cfg(["stage=dpo", "dpo.loss_type=kto"]))
    with pytest.raises(ConfigError, match="dpo.beta=0.0 is out of range"):
        validate(compose_cfg(["stage=dpo", "dpo.beta=0.0"]))
    with pytest.raises(ConfigError, match="eval.policy='grpo' is not valid"):
        validate(compose_cfg(["stage=eval", "eval.policy=grpo"]))
