"""Stage 'rm': train the reward model on vote-ranked answer pairs (the article's step 2).

Recipe: the SFT model (or ``rm.model_path``) becomes a 1-label sequence classifier with
LoRA adapters (the ``score`` head is trained in full through peft's ``modules_to_save``),
trained by TRL's ``RewardTrainer`` on ``-log sigmoid(r_chosen - r_rejected)`` over pairs of
answers to the same question from the ``reward`` split. Each text is the prompt template
filled with question and answer; TRL appends EOS and we tokenize exactly as it would.

* With ``rm.group_by_question`` (default) the pairs of one question share a batch and each
  distinct answer text is forwarded once per batch (``stackllama.reward.batches``): TRL's
  loss on the same pairs at ~1/2.5 of the forwards, optionally in length-sorted chunks
  (``rm.forward_chunk_size``). A cap (``rm.max_train_pairs``) then keeps whole questions.
* Pairs where the chosen or rejected text is longer than ``rm.max_length`` tokens are
  dropped *before* training and counted (``data/dropped_too_long``: among the pairs
  examined in shuffled order until ``rm.max_train_pairs`` were kept).
* Held-out evaluation on the ``evaluation`` split goes through ``RewardScorer`` (the same
  code PPO uses, long texts left-truncated), before and after training:
  ``eval/accuracy`` (better answer scored strictly higher), ``eval/margin``,
  ``eval/accuracy_before``, ``eval/longer_wins_accuracy`` (the "longer answer wins"
  baseline: on real Stack Exchange data length alone ranks ~65% of pairs), and on
  synthetic data ``eval/gold_accuracy`` (the hidden gold scorer's accuracy on the same
  pairs: what noise-free votes would allow).
* The adapters are merged and a plain ``AutoModelForSequenceClassification`` folder is
  saved *with its trained score head* (the classic StackLlama merge lost or re-initialized
  it: TRL issues #297, #368); a quantized base is reloaded unquantized in
  ``quantization.compute_dtype`` and the saved adapter (score head included) merged there.
  The saved folder is reloaded and re-scored on evaluation texts; the largest difference
  from the trained in-memory model is ``eval/merge_max_abs_diff``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import torch

from stackllama import distributed, pipeline, precision
from stackllama.reward import RewardScorer, encode_reward_texts, format_text, pairwise_metrics
from stackllama.reward.batches import DedupPreferenceCollator, grouped_reward_trainer

log = logging.getLogger(__name__)

MERGE_CHECK_TEXTS = 32  # evaluation texts re-scored with the saved folder


def _shuffled(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-rm").shuffle(order)
    return order


def encode_train_pairs(
    dataset: Any,
    tokenizer: Any,
    template: str,
    max_length: int | None,
    cap: int | None,
    seed: int,
    chunk: int = 512,
    group_by_question: bool = False,
) -> tuple[dict[str, list], int, int]:
    """Token ids of ``cap`` pairs (all when None) no longer than ``max_length``, in shuffled order.

    Returns ``(columns, dropped_too_long, examined)``: columns hold ``chosen_ids`` and
    ``rejected_ids`` as TRL's RewardTrainer would build them (template + EOS, tokenized) and
    ``group``, the index of each kept pair's question. With ``group_by_question`` the
    questions are shuffled and each one's pairs taken together (so a cap keeps whole
    questions and their shared answers); otherwise the pairs are shuffled one by one.
    """
    questions = dataset["question"]
    if group_by_question:
        by_question: dict[str, list[int]] = {}
        for i, q in enumerate(questions):
            by_question.setdefault(q, []).append(i)
        blocks = list(by_question.values())
        order = [i for b in _shuffled(len(blocks), seed) for i in blocks[b]]
    else:
        order = _shuffled(len(dataset), seed)
    group_of: dict[str, int] = {}
    cols: dict[str, list] = {"chosen_ids": [], "rejected_ids": [], "group": []}
    dropped = examined = 0
    limit = len(order) if cap is None else int(cap)
    for start in range(0, len(order), chunk):
        if len(cols["chosen_ids"]) >= limit:
            break
        idx = order[start : start + chunk]
        rows = dataset.select(idx)
        qs = rows["question"]
        chosen = encode_reward_texts(tokenizer, [format_text(template, q, a) for q, a in zip(qs, rows["chosen"])])
        rejected = encode_reward_texts(tokenizer, [format_text(template, q, a) for q, a in zip(qs, rows["rejected"])])
        for i, c, r in zip(idx, chosen, rejected):
            if len(cols["chosen_ids"]) >= limit:
                break
            examined += 1
            if max_length is not None and (len(c) > max_length or len(r) > max_length):
                dropped += 1
                continue
            cols["chosen_ids"].append(list(c))
            cols["rejected_ids"].append(list(r))
            cols["group"].append(group_of.setdefault(questions[i], len(group_of)))
    return cols, dropped, examined


def pair_groups(cols: dict[str, list], group_by_question: bool) -> tuple[list[list[int]], list[int]]:
    """Pair indices per question (or one per pair) and each group's longest text, for the sampler."""
    lengths = [max(len(c), len(r)) for c, r in zip(cols["chosen_ids"], cols["rejected_ids"])]
    if not group_by_question:
        return [[i] for i in range(len(lengths))], lengths
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(cols["group"]):
        groups.setdefault(g, []).append(i)
    members = list(groups.values())
    return members, [max(lengths[i] for i in m) for m in members]


def eval_pairs(dataset: Any, cap: int | None, seed: int) -> Any:
    """The held-out pairs scored (a seeded sample of ``cap`` when capped)."""
    if cap is not None and len(dataset) > int(cap):
        return dataset.select(sorted(_shuffled(len(dataset), seed + 1)[: int(cap)]))
    return dataset


def evaluate_pairs(scorer: RewardScorer, pairs: Any) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """Pairwise metrics and the chosen/rejected scores; each distinct (question, answer) scored once."""
    qs = list(pairs["question"])
    texts = list(zip(qs, pairs["chosen"])) + list(zip(qs, pairs["rejected"]))
    distinct = list(dict.fromkeys(texts))
    scores = scorer.score([q for q, _ in distinct], [a for _, a in distinct])
    row = {t: i for i, t in enumerate(distinct)}
    both = scores[torch.tensor([row[t] for t in texts], dtype=torch.long)] if texts else scores
    chosen, rejected = both[: len(qs)], both[len(qs) :]
    return pairwise_metrics(chosen, rejected), chosen, rejected


def gold_accuracy(gold: Any, pairs: Any) -> float:
    qs = list(pairs["question"])
    good = torch.tensor(gold(qs, list(pairs["chosen"])), dtype=torch.float64)
    bad = torch.tensor(gold(qs, list(pairs["rejected"])), dtype=torch.float64)
    return float((good > bad).double().mean()) if len(qs) else float("nan")


def longer_wins_accuracy(pairs: Any) -> float:
    """Baseline: the accuracy of "the longer answer (in characters) is the better one"."""
    wins = [len(c) > len(r) for c, r in zip(pairs["chosen"], pairs["rejected"])]
    return sum(wins) / len(wins) if wins else float("nan")


def reward_config(cfg: Any, ctx: Any, work_dir: Path):
    from trl import RewardConfig

    from stackllama.hf_trainer import checkpointing_kwargs

    rm = cfg.rm
    return RewardConfig(
        output_dir=str(work_dir / "checkpoints"),
        learning_rate=float(rm.learning_rate),
        per_device_train_batch_size=int(rm.batch_size),
        per_device_eval_batch_size=int(rm.eval_batch_size),
        gradient_accumulation_steps=int(rm.gradient_accumulation_steps),
        num_train_epochs=float(rm.num_train_epochs),
        max_steps=int(rm.max_steps),
        weight_decay=float(rm.weight_decay),
        lr_scheduler_type=str(rm.lr_scheduler_type),
        warmup_steps=int(rm.warmup_steps),
        logging_steps=int(rm.logging_steps),
        max_length=int(rm.max_length),
        **checkpointing_kwargs(bool(rm.gradient_checkpointing)),
        center_rewards_coefficient=None,
        disable_dropout=False,  # honour rm.lora.dropout (the article's 0.1)
        **precision.trainer_flags(precision.trainer_mode(cfg, ctx.device)),
        use_cpu=ctx.device.type == "cpu",
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        seed=int(cfg.seed),
        data_seed=int(cfg.seed),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def save_merged(cfg: Any, model: Any, tokenizer: Any, base_path: Path, work_dir: Path, out_dir: Path) -> str:
    """Write a plain seq-cls folder (merged weights, trained score head, tokenizer) to ``out_dir``."""
    from peft import PeftModel

    quantized = cfg.quantization.mode != "none"
    if isinstance(model, PeftModel):
        if quantized:
            from stackllama.models.merge import merge_adapter_into_base

            adapter = work_dir / "adapter"
            model.save_pretrained(str(adapter))  # LoRA weights + the score head (modules_to_save)
            merge_adapter_into_base(
                base_path,
                adapter,
                out_dir,
                "seq_cls",
                cfg.quantization.compute_dtype,
                tokenizer,
                num_layers=cfg.rm.num_layers,
            )
            return "reloaded_unquantized"
        merged = model.merge_and_unload()
    else:
        if quantized:
            raise ValueError("a quantized reward model without LoRA adapters cannot be saved")
        merged = model
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return "in_memory"


def training_data(cfg: Any, tokenizer: Any) -> tuple[dict[str, list], Any, dict[str, Any]]:
    """The reward split's pairs as token ids (clear pairs only, too-long ones dropped and counted),
    the held-out evaluation pairs, and the data metrics."""
    from stackllama.data import build_dataset
    from stackllama.data.recipe import clear_pairs

    rm = cfg.rm
    template = cfg.data.prompt_template
    seed = int(cfg.seed)
    max_length = int(rm.max_length)
    metrics: dict[str, Any] = {}
    splits = build_dataset(cfg.data)
    metrics.update(splits.stats)
    if len(splits.reward) == 0:
        from stackllama.data import NoUsableRecords, data_location

        raise NoUsableRecords(
            f"No usable records for the reward model in {data_location(cfg.data)}: the reward split's "
            f"{splits.stats.get('data/reward_questions', 0)} questions give no pair of answers with different "
            "votes (pm_score); raise data.splits.reward or use more data"
        )

    grouped = bool(rm.group_by_question)
    train_pairs = clear_pairs(splits.reward, int(rm.min_pm_margin))
    metrics["data/below_pm_margin"] = len(splits.reward) - len(train_pairs)
    if len(train_pairs) == 0:
        raise ValueError(
            f"no reward pairs to train on: none of the {len(splits.reward)} pairs differ by rm.min_pm_margin="
            f"{int(rm.min_pm_margin)} or more in pm_score; lower it"
        )
    if metrics["data/below_pm_margin"]:
        log.info(
            "rm: %d of %d pairs differ by less than rm.min_pm_margin=%d in pm_score; not trained on",
            metrics["data/below_pm_margin"],
            len(splits.reward),
            int(rm.min_pm_margin),
        )
    cols, dropped, examined = encode_train_pairs(
        train_pairs, tokenizer, template, max_length, rm.max_train_pairs, seed, group_by_question=grouped
    )
    if not cols["chosen_ids"]:
        raise ValueError(
            f"no reward pairs left to train on: {dropped} of {examined} examined are longer than "
            f"rm.max_length={max_length} tokens"
        )
    evaluation = eval_pairs(splits.evaluation, rm.max_eval_pairs, seed)
    if len(evaluation) == 0:
        raise ValueError("the evaluation split holds no pairs: raise data.splits.evaluation or data.max_questions")
    metrics.update(
        {
            "data/train_pairs": len(cols["chosen_ids"]),
            "data/eval_pairs": len(evaluation),
            "data/dropped_too_long": dropped,
            "data/examined_pairs": examined,
        }
    )
    log.info(
        "rm: %d training pairs (%d of %d examined dropped as longer than %d tokens), %d eval pairs%s",
        len(cols["chosen_ids"]),
        dropped,
        examined,
        max_length,
        len(evaluation),
        ", pairs grouped by question" if grouped else "",
    )

    return cols, evaluation, metrics


def save_checked(
    cfg: Any,
    ctx: Any,
    model: Any,
    tokenizer: Any,
    base_path: Path,
    work_dir: Path,
    out_dir: Path,
    check: Any,
    expected: Any,
) -> dict[str, Any]:
    """Merge and save the reward model; then reload the folder and check it scores the ``check``
    pairs' chosen answers as the trained model did (``expected``, scored without autocast)."""
    rm = cfg.rm
    metrics = {"merge/method": save_merged(cfg, model, tokenizer, base_path, work_dir, out_dir)}
    reloaded = RewardScorer.from_pretrained(
        out_dir,
        device=ctx.device,
        batch_size=int(rm.eval_batch_size),
        max_length=int(rm.max_length),
        template=cfg.data.prompt_template,
        dtype=_saved_dtype(cfg),
    )
    got = reloaded.score(list(check["question"]), list(check["chosen"]))
    diff = float((got - expected).abs().max())
    metrics["eval/merge_max_abs_diff"] = diff
    scale = 1.0 + float(expected.abs().max())
    if cfg.quantization.mode == "none" and _saved_dtype(cfg) == "float32" and diff > 1e-3 * scale:
        raise RuntimeError(
            f"the merged reward model scores differ from the trained one by {diff:.4g}: "
            "the score head or adapters were not merged correctly"
        )
    if diff > 5e-2 * scale:
        log.warning("merged reward model differs from the trained one by up to %.4g", diff)
    return metrics


def build(cfg: Any, ctx: Any, inputs: dict[str, Path], work_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train the reward model on ``inputs["sft"]`` (data: ``training_data``), score the held-out
    pairs, merge, save into ``out_dir`` and check the saved folder (``save_checked``)."""
    from stackllama.data import gold_scorer
    from stackllama.models.loader import count_parameters, load_model, load_tokenizer
    from stackllama.tracking import trainer_callback

    rm = cfg.rm
    base_path = inputs["sft"]  # the SFT artifact, or rm.model_path (stackllama/pipeline.py)
    template = cfg.data.prompt_template
    max_length = int(rm.max_length)
    tokenizer = load_tokenizer(base_path, padding_side="right")
    cols, evaluation, metrics = training_data(cfg, tokenizer)
    grouped = bool(rm.group_by_question)

    def load() -> Any:
        return load_model(
            base_path,
            "seq_cls",
            cfg.quantization,
            rm.lora,
            dtype=cfg.model.dtype,
            device=ctx.device,
            tokenizer=tokenizer,
            gradient_checkpointing=bool(rm.gradient_checkpointing),
            num_layers=rm.num_layers,
        )

    model = load()
    metrics.update(count_parameters(model))
    main = distributed.is_main()  # under DDP every rank trains; rank 0 alone evaluates and saves

    def scorer(net: Any, mixed_precision: str = precision.run_mode(cfg)) -> RewardScorer:
        return RewardScorer(
            net,
            tokenizer,
            template,
            batch_size=int(rm.eval_batch_size),
            max_length=max_length,
            device=ctx.device,
            mixed_precision=mixed_precision,
        )

    started = time.time()
    before = {"accuracy": float("nan"), "margin": float("nan")}
    if main and rm.eval_before:
        log.info("rm: scoring %d held-out pairs with the untrained model ...", len(evaluation))
        before, _, _ = evaluate_pairs(scorer(model), evaluation)
        metrics["eval/accuracy_before"] = before["accuracy"]
        metrics["eval/margin_before"] = before["margin"]
        metrics["eval/seconds_before"] = round(time.time() - started, 2)

    import datasets

    train_set = datasets.Dataset.from_dict({k: cols[k] for k in ("chosen_ids", "rejected_ids")})
    groups, group_lengths = pair_groups(cols, grouped)
    distinct = len({tuple(x) for x in cols["chosen_ids"] + cols["rejected_ids"]})
    metrics["data/train_texts"] = distinct  # forwards per epoch when grouped (2 per pair when not)
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    trainer = grouped_reward_trainer(groups, group_lengths, rm.forward_chunk_size)(
        model=model,
        args=reward_config(cfg, ctx, work_dir),
        train_dataset=train_set,
        processing_class=tokenizer,
        data_collator=DedupPreferenceCollator(tokenizer.pad_token_id) if grouped else None,
        callbacks=[trainer_callback(ctx.tracker)],
    )
    # On a quantized base TRL casts the trainable weights (adapters and the score head) to
    # bfloat16, which only works under bf16 autocast; keep them in the dtype the base computes
    # in, as loaded (the optimizer is created later, by train()).
    for name, p in trainer.model.named_parameters():
        if name in dtypes and p.dtype != dtypes[name]:
            p.data = p.data.to(dtypes[name])
    started = time.time()
    log.info("rm: training on %d pairs (eval accuracy before training %.3f) ...", len(train_set), before["accuracy"])
    result = trainer.train()
    metrics["train/seconds"] = round(time.time() - started, 2)
    metrics["train/loss"] = float(result.training_loss)
    metrics["train/steps"] = int(result.global_step)
    history = [h for h in trainer.state.log_history if "accuracy" in h]
    if history:
        metrics["train/accuracy_last_log"] = float(history[-1]["accuracy"])
    model = distributed.trained_model_on_main(trainer, load)  # every rank takes part (ZeRO-3 shards)
    if not main:
        return metrics

    started = time.time()
    log.info(
        "rm: trained in %.0f s (loss %.4f); scoring the held-out pairs ...",
        metrics["train/seconds"],
        metrics["train/loss"],
    )
    after, chosen, rejected = evaluate_pairs(scorer(model), evaluation)
    metrics["eval/accuracy"] = after["accuracy"]
    metrics["eval/margin"] = after["margin"]
    metrics["eval/seconds"] = round(time.time() - started, 2)
    metrics["eval/longer_wins_accuracy"] = longer_wins_accuracy(evaluation)
    gold = gold_scorer(cfg.data)
    if gold is not None:
        metrics["eval/gold_accuracy"] = gold_accuracy(gold, evaluation)

    # Merge and save; then reload the folder and check it scores as the trained model did
    # (without autocast, so the check is not blurred by bf16 rounding).
    k = min(MERGE_CHECK_TEXTS, len(evaluation))
    check = evaluation.select(range(k))
    if precision.run_mode(cfg) == "no":
        expected = chosen[:k]  # scores come back in input order
    else:
        expected = scorer(model, "no").score(list(check["question"]), list(check["chosen"]))
    del trainer
    metrics.update(save_checked(cfg, ctx, model, tokenizer, base_path, work_dir, out_dir, check, expected))
    del model
    diff = metrics["eval/merge_max_abs_diff"]
    ctx.tracker.log({k2: v for k2, v in metrics.items() if k2.startswith("eval/") and isinstance(v, float)})
    log.info(
        "rm: eval accuracy %.3f (before %.3f, gold %s), margin %.3f, merge diff %.2g",
        metrics["eval/accuracy"],
        metrics.get("eval/accuracy_before", float("nan")),
        f"{metrics['eval/gold_accuracy']:.3f}" if "eval/gold_accuracy" in metrics else "n/a",
        metrics["eval/margin"],
        diff,
    )
    return metrics


def _saved_dtype(cfg: Any) -> str:
    """The dtype the merged folder holds (quantized bases are merged in the compute dtype)."""
    return cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype


def run(cfg: Any, ctx: Any) -> float | None:
    """Build (or reuse) the reward model artifact; the sweep objective is ``eval/accuracy``."""
    _, metrics = pipeline.run_stage("rm", cfg, ctx)
    value = metrics.get("eval/accuracy")
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


__all__ = ["build", "run", "encode_train_pairs", "eval_pairs", "save_merged"]
