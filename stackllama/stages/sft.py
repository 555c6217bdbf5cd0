"""Stage 'sft': domain adaptation with the causal-LM objective (StackLlama step 1).

The article fine-tunes the base model on ``Question: ...\\n\\nAnswer: ...`` texts of the
finetune split, packed into fixed-length blocks so no compute is spent on padding, with
LoRA adapters on an 8-bit base; then it merges the adapters into the base weights, so
the reward model and PPO start from a plain model. ``build`` does exactly that with TRL's
SFTTrainer and measures what the step bought: held-out perplexity before and after.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from stackllama import distributed, precision
from stackllama.hf_trainer import checkpointing_kwargs
from stackllama.models.lm_head_logprobs import install_for_trl
from stackllama.models.loader import count_parameters, load_causal_lm, load_tokenizer, model_folder, torch_dtype
from stackllama.models.merge import merge_trained, save_plain_model
from stackllama.stages import sft_utils
from stackllama.tracking import trainer_callback

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
SAMPLES_FILE = "sft_samples.md"


def run(cfg: Any, ctx: Any) -> float:
    """Build (or reuse) the SFT artifact; the sweep objective is its held-out perplexity."""
    from stackllama.pipeline import run_stage

    _, metrics = run_stage("sft", cfg, ctx)
    return float(metrics["eval/perplexity"])


def build(cfg: Any, ctx: Any, inputs: dict[str, Path], work_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Train, measure, merge and save the SFT model into ``out_dir``; return its metrics.

    Under DDP every rank trains; rank 0 alone evaluates, merges, saves and samples (the
    artifact store publishes rank 0's folder and metrics).
    """
    work_dir = Path(work_dir)
    main = distributed.is_main()
    splits, train_ds, held_ds = load_texts(cfg)
    base_path = model_folder(cfg.model)
    tokenizer = load_tokenizer(base_path)
    model = load_policy(cfg, ctx, base_path, tokenizer)
    metrics: dict[str, Any] = {**splits.stats, **count_parameters(model)}
    metrics.update(
        {
            "data/sft_train_texts": len(train_ds),
            "data/sft_eval_texts": len(held_ds),
            "data/sft_eval_questions": len(set(held_ds["question"])),
        }
    )

    held_texts = list(held_ds["text"])
    if main:
        metrics["eval/perplexity_before"] = held_out_perplexity(cfg, ctx, model, tokenizer, held_texts)
        log.info("Held-out perplexity before SFT: %.3f", metrics["eval/perplexity_before"])

    trainer = make_trainer(cfg, ctx, model, tokenizer, train_ds, work_dir)
    metrics.update(train(cfg, trainer, work_dir))
    # Every rank must take part (under ZeRO-3 the weights are sharded across ranks).
    model = distributed.trained_model_on_main(trainer, lambda: load_policy(cfg, ctx, base_path, tokenizer))
    if not main:
        return metrics

    metrics["eval/perplexity"] = held_out_perplexity(cfg, ctx, model, tokenizer, held_texts)
    log.info("Held-out perplexity: %.3f -> %.3f", metrics["eval/perplexity_before"], metrics["eval/perplexity"])

    merged = merge_trained(model, base_path, "causal_lm", cfg.quantization, work_dir / ADAPTER, ctx.device)
    del trainer, model
    if cfg.quantization.mode != "none":
        # The shipped model is the adapter on full-precision weights, not on the quantized ones
        # it was trained against; record what that changes.
        metrics["eval/perplexity_merged"] = held_out_perplexity(cfg, ctx, merged, tokenizer, held_texts)
    save_plain_model(merged, tokenizer, out_dir)
    log_samples(cfg, ctx, merged, tokenizer, held_ds)
    return metrics


# --------------------------------------------------------------------------- steps


def load_texts(cfg: Any):
    """The finetune split as (splits, training texts, held-out texts)."""
    from stackllama.data import NoUsableRecords, build_dataset, data_location

    splits = build_dataset(cfg.data)
    finetune = splits.finetune
    if len(finetune) == 0:
        raise NoUsableRecords(
            f"No usable records for SFT in {data_location(cfg.data)}: the finetune split's "
            f"{splits.stats.get('data/finetune_questions', 0)} questions have no answer voted above another "
            "(an SFT text is an answer that wins a pair); raise data.splits.finetune or use more data"
        )
    questions = len(set(finetune["question"]))
    fraction, cap = float(cfg.sft.eval_fraction), int(cfg.sft.eval_size)
    train_ds, held_ds = sft_utils.hold_out_questions(finetune, cap, int(cfg.seed), fraction)
    held_questions = len(set(held_ds["question"]))
    log.info(
        "SFT held out %d of %d finetune questions (%d texts) for perplexity: sft.eval_fraction=%g of the "
        "questions, at most sft.eval_size=%d texts, at least one question left to train on",
        held_questions,
        questions,
        len(held_ds),
        fraction,
        cap,
    )
    if len(held_ds) == 0:
        log.warning("SFT holds out nothing (%d finetune question(s)): eval/perplexity will be NaN", questions)
    train_ds = sft_utils.cap_texts(train_ds, cfg.sft.max_train_texts, int(cfg.seed))
    log.info("SFT texts: %d to train on, %d held out for perplexity", len(train_ds), len(held_ds))
    return splits, train_ds, held_ds


def load_policy(cfg: Any, ctx: Any, base_path: Path, tokenizer: Any):
    """The base causal LM with the configured quantization and LoRA adapters."""
    return load_causal_lm(cfg, base_path, ctx.device, tokenizer, bool(cfg.sft.gradient_checkpointing))


def held_out_perplexity(cfg: Any, ctx: Any, model: Any, tokenizer: Any, texts: list[str]) -> float:
    """The one perplexity function used before and after, so the two figures compare."""
    return sft_utils.perplexity(
        model, tokenizer, texts, int(cfg.sft.seq_length), int(cfg.sft.eval_batch_size), ctx.device
    )


def training_args(cfg: Any, ctx: Any, work_dir: Path):
    """``trl.SFTConfig`` from ``cfg.sft``: the article's packing and schedule, our tracking."""
    from trl import SFTConfig

    sft = cfg.sft
    on_cuda = ctx.device.type == "cuda"
    mixed = precision.trainer_mode(cfg, ctx.device)  # autocast over model.dtype weights
    return SFTConfig(
        output_dir=str(work_dir / CHECKPOINTS),
        max_steps=int(sft.max_steps),
        per_device_train_batch_size=int(sft.batch_size),
        gradient_accumulation_steps=int(sft.gradient_accumulation_steps),
        learning_rate=float(sft.learning_rate),
        lr_scheduler_type=str(sft.lr_scheduler_type),
        warmup_steps=int(sft.warmup_steps),
        weight_decay=float(sft.weight_decay),
        logging_steps=int(sft.logging_steps),
        save_strategy="steps",
        save_steps=int(sft.save_steps),
        save_total_limit=int(sft.save_total_limit),
        seed=int(cfg.seed),
        report_to="none",  # our TrackerCallback forwards the logs
        use_cpu=not on_cuda,
        **precision.trainer_flags(mixed),
        dataset_text_field="text",
        max_length=int(sft.seq_length),
        packing=bool(sft.packing),
        # bfd_split: best-fit packing that splits over-long texts instead of dropping their
        # tails, so (like the article's ConstantLengthDataset) every token is trained on;
        # unlike it, texts never attend across their boundaries (padding-free batches).
        packing_strategy="bfd_split",
        **checkpointing_kwargs(bool(sft.gradient_checkpointing)),
    )


def make_trainer(cfg: Any, ctx: Any, model: Any, tokenizer: Any, train_ds: Any, work_dir: Path):
    """An SFTTrainer on our already loaded model, its collator wrapped to count padding."""
    from trl import SFTTrainer

    install_for_trl()  # TRL's fused LM head without Triton (CPU): ours, ~2x faster (models/lm_head_logprobs.py)
    counter = sft_utils.TokenCountingCollator(None)  # its collator is set below, once TRL has built its own
    trainer = SFTTrainer(
        model=model,
        args=training_args(cfg, ctx, work_dir),
        train_dataset=train_ds.select_columns(["text"]),
        processing_class=tokenizer,
        # TRL counts a position_ids batch's tokens as its width (right for its one flattened row
        # only): the counter's real tokens replace them in the log
        callbacks=[trainer_callback(ctx.tracker, overrides=lambda: {"num_tokens": float(counter.real_tokens)})],
    )
    if cfg.quantization.mode != "none":
        sft_utils.cast_trainable(trainer.model, torch_dtype(cfg.quantization.compute_dtype))
    # Replaced after construction: SFTTrainer refuses a custom collator with padding-free
    # batches, but only builds its dataloader (reading this attribute) inside train().
    counter.collator = trainer.data_collator
    if trainer.padding_free and not _varlen_attention(trainer.model):
        counter.collator = sft_utils.PackedRowsCollator(tokenizer.pad_token_id)  # bins as rows: see its docstring
    trainer.data_collator = counter
    return trainer


def _varlen_attention(model: Any) -> bool:
    """Whether the attention kernel takes TRL's one flattened padding-free row natively (flash
    attention's varlen kernels); SDPA and eager build a dense mask over it."""
    impl = str(getattr(getattr(model, "config", None), "_attn_implementation", "") or "")
    return "flash" in impl


def resume_checkpoint(cfg: Any, work_dir: Path) -> tuple[str | None, int]:
    """The last complete checkpoint in ``work_dir`` and its step, when resuming is on.

    A job killed while saving leaves a ``checkpoint-N`` folder without trainer_state.json
    (the Trainer writes it last); such folders are removed so an older complete one is used.
    """
    from transformers.trainer_utils import get_last_checkpoint

    folder = work_dir / CHECKPOINTS
    if not cfg.sft.resume or not folder.is_dir():
        return None, 0
    while (last := get_last_checkpoint(str(folder))) is not None:
        if (Path(last) / "trainer_state.json").exists():
            return last, sft_utils.read_checkpoint_step(last)
        log.warning("Removing incomplete checkpoint %s (the job died while saving it)", last)
        shutil.rmtree(last, ignore_errors=True)
    return None, 0


class _TrainingComplete(Exception):
    """Raised by the ``_stop_before_training`` callback once the Trainer restored a finished checkpoint."""


def _stop_before_training():
    """A TrainerCallback ending ``Trainer.train`` at ``on_train_begin`` (the checkpoint restored by
    then) when no step is left: ``control.should_training_stop`` is only read after a step, so
    raising is the way out."""
    from transformers import TrainerCallback

    class StopBeforeTraining(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise _TrainingComplete()

    return StopBeforeTraining()


def train(cfg: Any, trainer: Any, work_dir: Path) -> dict[str, Any]:
    """Run (or resume) training; return loss, throughput and padding figures."""
    # rank 0 decides (it may delete a half-written checkpoint); the other ranks follow
    checkpoint, step = distributed.on_main(lambda: resume_checkpoint(cfg, work_dir), name="sft-resume")
    if checkpoint:
        log.info("Resuming SFT from %s (step %d)", checkpoint, step)
    fingerprint = sft_utils.trainable_fingerprint(trainer.model)
    started = time.perf_counter()
    output = None
    if checkpoint and step >= int(cfg.sft.max_steps):
        # A checkpoint at (or past) max_steps is the finished model. The Trainer checks for the end
        # only after a step, so resuming from it would train one step more (train/steps=3 for
        # max_steps=2) and one artifact key would hold two different models. Let the Trainer restore
        # the checkpoint (weights, state; under DeepSpeed/FSDP too) and stop it before that step.
        log.info(
            "SFT checkpoint %s is at step %d of sft.max_steps=%d: restoring it, nothing left to train",
            checkpoint,
            step,
            int(cfg.sft.max_steps),
        )
        trainer.add_callback(_stop_before_training())
        try:
            trainer.train(resume_from_checkpoint=checkpoint)
        except _TrainingComplete:
            pass
    else:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    seconds = time.perf_counter() - started
    if trainer.state.global_step > step and sft_utils.trainable_fingerprint(trainer.model) == fingerprint:
        log.warning("SFT ran %d steps but no trainable parameter changed", trainer.state.global_step - step)
    counter: sft_utils.TokenCountingCollator = trainer.data_collator
    real, slots = distributed.all_reduce_sum(counter.real_tokens), distributed.all_reduce_sum(counter.total_tokens)
    steps_now = trainer.state.global_step - step
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        # the Trainer's average over the steps this call ran; the logged mean if it ran none
        "train/loss": float(output.training_loss) if output is not None and steps_now > 0 else _mean(logged),
        "train/loss_final": logged[-1] if logged else (float(output.training_loss) if output else float("nan")),
        "train/steps": int(trainer.state.global_step),
        "train/seconds": round(seconds, 3),
        "train/tokens": real,  # every rank's batches
        "train/tokens_per_second": real / seconds if seconds > 0 else 0.0,
        "train/padding_fraction": 1.0 - real / slots if slots else 0.0,
        "train/resumed_from_step": step,
    }


def log_samples(cfg: Any, ctx: Any, model: Any, tokenizer: Any, held_ds: Any) -> None:
    """Generate for a few held-out questions; log them as a table and ``sft_samples.md``."""
    from stackllama.data import format_prompt

    n = int(cfg.sft.num_sample_generations)
    questions = list(dict.fromkeys(held_ds["question"]))[:n]  # distinct questions, held-out order
    if not questions:
        return
    prompts = [format_prompt(cfg.data.prompt_template, q).rstrip() for q in questions]
    responses = sft_utils.generate_responses(model, tokenizer, prompts, int(cfg.sft.sample_max_new_tokens), ctx.device)
    rows = list(zip(questions, responses))
    ctx.tracker.log_table("sft/samples", ["question", "response"], [list(r) for r in rows])
    path = Path(ctx.run_dir) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sft_utils.samples_markdown("SFT samples (greedy, held-out questions)", rows))
    log.info("Wrote %d sample generations to %s", len(rows), path)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


__all__ = ["build", "run"]
