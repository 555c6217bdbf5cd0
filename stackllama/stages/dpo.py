"""Stage 'dpo': direct preference optimization on the reward split's pairs (Rafailov et al. 2023).

The offline alternative to the RM + PPO steps: TRL's ``DPOTrainer`` trains the SFT model (the
``sft`` input: the SFT artifact or ``dpo.policy_path``) on the same vote-ranked pairs the reward
model learns from, with the loss

    L = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

where y_w is the better-voted answer, y_l the other, and pi_ref the SFT model (the LoRA adapters
disabled). No reward model, no sampling. ``lora`` and ``quantization`` come from the same groups
as SFT's; the adapters are merged as SFT's are, so ``stage=eval eval.policy=dpo`` judges the saved
folder against SFT with the reward model and the gold scorer like a PPO policy.

* Pairs: the reward split's, those differing by ``dpo.min_pm_margin`` or more in pm_score, at
  most ``dpo.max_train_pairs``; pairs whose prompt + answer exceed ``dpo.max_length`` tokens are
  dropped and counted (``data/dropped_too_long``) rather than truncated.
* Held-out: ``dpo.max_eval_pairs`` pairs of the evaluation split, scored by TRL's evaluation:
  ``eval/implicit_reward_accuracy`` (the implicit reward beta * log pi/pi_ref ranks the better
  answer higher) and ``eval/implicit_reward_margin``.
* No mid-run checkpoints: a killed DPO build starts again (the embedded run takes minutes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from stackllama import distributed, precision
from stackllama.hf_trainer import checkpointing_kwargs
from stackllama.models.lm_head_logprobs import install_for_trl
from stackllama.models.loader import count_parameters, load_causal_lm, load_tokenizer
from stackllama.models.merge import merge_trained, save_plain_model

log = logging.getLogger(__name__)


def run(cfg: Any, ctx: Any) -> float:
    """Build (or reuse) the DPO artifact; the sweep objective is its held-out implicit-reward accuracy."""
    from stackllama.pipeline import run_stage

    _, metrics = run_stage("dpo", cfg, ctx)
    return float(metrics["eval/implicit_reward_accuracy"])


def preference_rows(pairs: Any, tokenizer: Any, template: str, max_length: int) -> tuple[dict[str, list], int]:
    """``{"prompt", "chosen", "rejected"}`` columns as TRL's DPOTrainer reads them (prompt + answer
    is our SFT text; TRL appends EOS), the pairs longer than ``max_length`` tokens left out.
    Returns the columns and the number left out."""
    from stackllama.data.recipe import format_prompt, format_text

    cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    if len(pairs) == 0:
        return cols, 0
    qs, good, bad = list(pairs["question"]), list(pairs["chosen"]), list(pairs["rejected"])

    def lengths(answers: list[str]) -> list[int]:
        texts = [format_text(template, q, a) for q, a in zip(qs, answers)]
        return [len(ids) + 1 for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # + EOS

    dropped = 0
    for q, c, r, nc, nr in zip(qs, good, bad, lengths(good), lengths(bad)):
        if max(nc, nr) > max_length:
            dropped += 1
            continue
        # The prompt ends on a token boundary ("Answer:"), its trailing space starting each answer
        # (" word" is one token): prompt + answer is the SFT text and TRL splits it where we do.
        prompt = format_prompt(template, q)
        head = prompt.rstrip()
        cols["prompt"].append(head)
        cols["chosen"].append(prompt[len(head) :] + c)
        cols["rejected"].append(prompt[len(head) :] + r)
    return cols, dropped


def training_pairs(cfg: Any, tokenizer: Any) -> tuple[Any, Any, dict[str, Any]]:
    """The reward split's clear pairs and the held-out evaluation pairs as TRL datasets, with the data metrics."""
    import datasets

    from stackllama.data import NoUsableRecords, build_dataset, data_location
    from stackllama.data.recipe import clear_pairs

    dpo = cfg.dpo
    splits = build_dataset(cfg.data)
    metrics: dict[str, Any] = dict(splits.stats)
    pairs = clear_pairs(splits.reward, int(dpo.min_pm_margin))
    metrics["data/below_pm_margin"] = len(splits.reward) - len(pairs)
    if len(pairs) == 0:
        raise NoUsableRecords(
            f"No pairs for DPO in {data_location(cfg.data)}: the reward split has {len(splits.reward)} pairs, none "
            f"differing by dpo.min_pm_margin={int(dpo.min_pm_margin)} or more in pm_score"
        )
    pairs = pairs.shuffle(seed=int(cfg.seed))
    if dpo.max_train_pairs is not None:
        pairs = pairs.select(range(min(len(pairs), int(dpo.max_train_pairs))))
    template, max_length = str(cfg.data.prompt_template), int(dpo.max_length)
    train_cols, dropped = preference_rows(pairs, tokenizer, template, max_length)
    if not train_cols["prompt"]:
        raise ValueError(f"every DPO pair is longer than dpo.max_length={max_length} tokens; raise it")
    held = splits.evaluation.shuffle(seed=int(cfg.seed) + 1)
    held = held.select(range(min(len(held), int(dpo.max_eval_pairs))))
    eval_cols, _ = preference_rows(held, tokenizer, template, max_length)
    metrics.update(
        {
            "data/dpo_train_pairs": len(train_cols["prompt"]),
            "data/dropped_too_long": dropped,
            "data/dpo_eval_pairs": len(eval_cols["prompt"]),
        }
    )
    log.info(
        "dpo: %d pairs to train on (%d below dpo.min_pm_margin, %d longer than %d tokens), %d held out",
        len(train_cols["prompt"]),
        metrics["data/below_pm_margin"],
        dropped,
        max_length,
        len(eval_cols["prompt"]),
    )
    return datasets.Dataset.from_dict(train_cols), datasets.Dataset.from_dict(eval_cols), metrics


def dpo_config(cfg: Any, ctx: Any, work_dir: Path):
    """``trl.DPOConfig`` from ``cfg.dpo``."""
    from trl import DPOConfig

    dpo = cfg.dpo
    return DPOConfig(
        output_dir=str(work_dir / "checkpoints"),
        beta=float(dpo.beta),
        loss_type=[str(dpo.loss_type)],
        learning_rate=float(dpo.learning_rate),
        lr_scheduler_type=str(dpo.lr_scheduler_type),
        warmup_steps=int(dpo.warmup_steps),
        weight_decay=float(dpo.weight_decay),
        per_device_train_batch_size=int(dpo.batch_size),
        per_device_eval_batch_size=int(dpo.batch_size),
        gradient_accumulation_steps=int(dpo.gradient_accumulation_steps),
        max_steps=int(dpo.max_steps),
        max_length=int(dpo.max_length),
        logging_steps=int(dpo.logging_steps),
        **checkpointing_kwargs(bool(dpo.gradient_checkpointing)),
        **precision.trainer_flags(precision.trainer_mode(cfg, ctx.device)),
        use_cpu=ctx.device.type == "cpu",
        report_to="none",  # our TrackerCallback forwards the logs
        save_strategy="no",
        eval_strategy="no",
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        dataloader_num_workers=0,
    )


def build(cfg: Any, ctx: Any, inputs: dict[str, Path], work_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train the SFT model ``inputs["sft"]`` with DPO, score held-out pairs, merge, save into ``out_dir``."""
    from trl import DPOTrainer

    from stackllama.tracking import trainer_callback

    work_dir = Path(work_dir)
    sft_path = inputs["sft"]  # the SFT artifact, or dpo.policy_path (stackllama/pipeline.py)
    tokenizer = load_tokenizer(sft_path, padding_side="right")
    train_ds, eval_ds, metrics = training_pairs(cfg, tokenizer)

    def load() -> Any:
        return load_causal_lm(cfg, sft_path, ctx.device, tokenizer, bool(cfg.dpo.gradient_checkpointing))

    model = load()
    metrics.update(count_parameters(model))
    install_for_trl()  # TRL's fused LM head without Triton (CPU): ours, ~2x faster (models/lm_head_logprobs.py)
    trainer = DPOTrainer(
        model=model,
        args=dpo_config(cfg, ctx, work_dir),
        train_dataset=train_ds,
        processing_class=tokenizer,
        callbacks=[trainer_callback(ctx.tracker)],
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    logged = [e for e in trainer.state.log_history if "loss" in e]
    last = logged[-1] if logged else {}
    metrics.update(
        {
            "train/loss": float(output.training_loss),
            "train/loss_final": float(last.get("loss", float("nan"))),  # the last logged batches' loss
            "train/steps": int(trainer.state.global_step),
            "train/seconds": round(seconds, 3),
            "train/pairs_per_second": trainer.state.global_step
            * int(cfg.dpo.batch_size)
            * int(cfg.dpo.gradient_accumulation_steps)
            / seconds
            if seconds > 0
            else 0.0,
            # TRL's figures on the last logged training batches
            "train/implicit_reward_accuracy": float(last.get("rewards/accuracies", float("nan"))),
            "train/implicit_reward_margin": float(last.get("rewards/margins", float("nan"))),
        }
    )
    model = distributed.trained_model_on_main(trainer, load)
    if not distributed.is_main():
        return metrics
    if len(eval_ds):
        scored = trainer.evaluate(eval_dataset=eval_ds)
        metrics.update(
            {
                "eval/implicit_reward_accuracy": float(scored["eval_rewards/accuracies"]),
                "eval/implicit_reward_margin": float(scored["eval_rewards/margins"]),
                "eval/dpo_loss": float(scored["eval_loss"]),
            }
        )
    else:
        log.warning("dpo: no held-out pairs (the evaluation split is empty): eval/implicit_reward_accuracy is NaN")
        metrics["eval/implicit_reward_accuracy"] = float("nan")
    log.info(
        "dpo: %d steps in %.0f s; held-out implicit-reward accuracy %.3f",
        metrics["train/steps"],
        seconds,
        metrics["eval/implicit_reward_accuracy"],
    )
    merged = merge_trained(model, sft_path, "causal_lm", cfg.quantization, work_dir / "adapter", ctx.device)
    del trainer, model
    save_plain_model(merged, tokenizer, out_dir)
    return metrics


__all__ = ["build", "run", "preference_rows", "training_pairs"]
