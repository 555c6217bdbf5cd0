"""Stage 'ppo': KL-penalized PPO of the SFT policy against the reward model.

``python -m stackllama stage=ppo ppo.kl_coef=0.1`` finds (or builds) the SFT and RM
artifacts for this config, trains with stackllama.ppo.trainer, and saves the merged
policy with its per-step history. Re-running the same command resumes from the last
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from stackllama import distributed, pipeline, precision
from stackllama.data import build_dataset, gold_scorer
from stackllama.data.prompts import PromptSource, eval_questions
from stackllama.models.loader import count_parameters, load_model, load_tokenizer
from stackllama.models.merge import merge_adapter_into_base
from stackllama.models.offload import Offloaded
from stackllama.models.onednn_linear import resolve_cpu_matmul, use_onednn_linears
from stackllama.ppo.policy import PolicyWithValueHead
from stackllama.ppo.trainer import PPOTrainer, summarize
from stackllama.reward import RewardScorer

log = logging.getLogger(__name__)


def ppo_lora(cfg: Any) -> Any:
    """The policy's adapters for PPO: the ``lora`` group, on ``ppo.lora_top_layers`` layers when set."""
    if cfg.ppo.lora_top_layers is None:
        return cfg.lora
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg.lora, {"top_layers": int(cfg.ppo.lora_top_layers)})


def load_policy(cfg: Any, sft_path: Path, device: torch.device) -> tuple[PolicyWithValueHead, Any]:
    """Policy + value head on one backbone; a frozen reference copy only without LoRA."""
    tok = load_tokenizer(sft_path, padding_side="left")
    lm = load_model(sft_path, "causal_lm", cfg.quantization, ppo_lora(cfg), cfg.model.dtype, device, tok)
    reference = None
    if not cfg.lora.enabled:
        reference = load_model(
            sft_path, "causal_lm", cfg.quantization, None, cfg.model.dtype, device, tok, trainable=False
        )
    policy = PolicyWithValueHead(lm, reference, cache_frozen_prefix=bool(cfg.ppo.cache_frozen_prefix)).to(device)
    policy.eval()  # no dropout in rollouts, old log-probs or updates: ratios start at exactly 1
    return policy, tok


def cpu_linears(
    cfg: Any, policy: PolicyWithValueHead, reward: RewardScorer, mixed_precision: str, device: torch.device
) -> str:
    """``ppo.cpu_matmul``: the policy's, the reference's and the reward model's CPU linear layers on
    oneDNN or left on MKL (stackllama/models/onednn_linear.py), in fp32 runs (``mixed_precision``
    no; under bf16 autocast they run on oneDNN already). Before ``offload_frozen``. Returns the
    library the fp32 linears run on: onednn | mkl, or none off the CPU."""
    if device.type != "cpu":
        return "none"
    mode = resolve_cpu_matmul(str(cfg.ppo.cpu_matmul)) if mixed_precision == "no" else "mkl"
    if mode == "onednn":
        layers = use_onednn_linears(policy, mode) + use_onednn_linears(reward.model, mode)
        log.info("ppo.cpu_matmul=%s: %d fp32 CPU linear layers on oneDNN", cfg.ppo.cpu_matmul, layers)
    return mode


def offload_frozen(
    cfg: Any, policy: PolicyWithValueHead, reward: RewardScorer, folder: Path
) -> tuple[Any, list[Offloaded]]:
    """``ppo.offload_ref_reward``: the reference copy (full fine-tuning) and the reward model kept in
    ``folder`` (CPU) or host memory (CUDA) between their passes. Returns the score function to train
    with (``reward.score``, the reward model's weights brought in for each call when offloaded) and
    the offloaded models (``close()`` each when done)."""
    if not cfg.ppo.offload_ref_reward:
        return reward.score, []
    rank = distributed.current().rank  # one file per process: data-parallel ranks share the work dir
    suffix = f".rank{rank}" if rank else ""
    offloaded = [Offloaded(reward.model, folder, "reward_model" + suffix)]
    if policy.reference is not None:
        policy.reference_offload = Offloaded(policy.reference, folder, "reference" + suffix)
        offloaded.append(policy.reference_offload)
    return offloaded[0].wrap(reward.score), offloaded


def save_policy(cfg: Any, policy: PolicyWithValueHead, tok: Any, sft_path: Path, work_dir: Path, out_dir: Path) -> None:
    """Merged policy weights + tokenizer in ``out_dir``; adapters and value head beside them."""
    torch.save(policy.v_head.state_dict(), out_dir / "value_head.pt")
    if cfg.lora.enabled:
        adapter_dir = work_dir / "adapter"
        policy.lm.save_pretrained(str(adapter_dir))
        merge_adapter_into_base(
            sft_path,
            adapter_dir,
            out_dir,
            "causal_lm",
            cfg.quantization.compute_dtype if cfg.quantization.mode != "none" else cfg.model.dtype,
            tok,
        )
    else:
        policy.lm.save_pretrained(str(out_dir))
        tok.save_pretrained(str(out_dir))


HELDOUT_FILE = "heldout.jsonl"  # the curve along training (ppo.eval_every)


def heldout_prompts(cfg: Any, splits: Any, tok: Any) -> PromptSource:
    """The evaluation's first eval.num_questions held-out questions (those the eval stage judges),
    tokenized as RL prompts, for ``ppo.eval_every``."""
    from stackllama.data import format_prompt

    questions = eval_questions(list(splits.evaluation["question"]), int(cfg.eval.num_questions))
    if not questions:
        raise ValueError("ppo.eval_every needs held-out questions: the evaluation split is empty")
    queries = [format_prompt(cfg.data.prompt_template, q) for q in questions]
    return PromptSource(questions, queries, tok, int(cfg.ppo.max_prompt_length), int(cfg.seed))


def heldout_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """The curve's end point and, with a gold scorer, its peak gold score and where it was."""
    if not rows:
        return {}
    out = {f"heldout/{k}_end": rows[-1][k] for k in ("reward_mean", "kl_mean", "gold_mean") if k in rows[-1]}
    out["heldout/points"] = len(rows)
    if "gold_mean" in rows[-1]:
        peak = max(rows, key=lambda r: r["gold_mean"])
        out.update({"heldout/gold_max": peak["gold_mean"], "heldout/gold_max_step": peak["step"]})
    return out


def trainable_norm(policy: PolicyWithValueHead) -> float:
    """Sum of the trained tensors' norms (adapters and value head)."""
    return float(sum(p.detach().float().norm() for p in policy.trainable_parameters()))


def build(cfg: Any, ctx: Any, inputs: dict[str, Path], work_dir: Path, out_dir: Path) -> dict[str, Any]:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise ValueError(
            "stage=ppo trains data-parallel by averaging gradients itself; DeepSpeed ZeRO configs apply to "
            "stage=sft and stage=rm. Launch PPO with conf/accelerate/ddp.yaml"
        )
    sft_path, rm_path = inputs["sft"], inputs["rm"]  # artifacts or explicit paths (stackllama/pipeline.py)
    splits = build_dataset(cfg.data)
    if len(splits.rl) == 0:
        from stackllama.data import NoUsableRecords, data_location

        raise NoUsableRecords(
            f"No usable records for PPO in {data_location(cfg.data)}: the rl split holds no "
            "question; raise data.splits.rl or use more data"
        )
    gold = gold_scorer(cfg.data)

    policy, tok = load_policy(cfg, sft_path, ctx.device)
    mixed = precision.run_mode(cfg, cfg.ppo.mixed_precision)  # checked at start (task.resolve_precision)
    dist = distributed.current()
    # Data parallel: the same starting weights everywhere, a different stream of prompts,
    # lengths and samples on each rank (rank 0 keeps the single-process seeds).
    distributed.broadcast_parameters(policy.trainable_parameters())
    seed = int(cfg.seed) + 1000 * dist.rank
    if dist.rank:
        torch.manual_seed(seed)
    reward = RewardScorer.from_pretrained(
        rm_path,
        device=ctx.device,
        batch_size=int(cfg.ppo.reward_batch_size),
        max_length=int(cfg.rm.max_length),  # score texts as the RM saw them in training
        template=cfg.data.prompt_template,
        quant_cfg=cfg.quantization,
        mixed_precision=mixed,
    )
    params = count_parameters(policy)  # before offloading empties the reference copy's tensors
    cpu_matmul = cpu_linears(cfg, policy, reward, mixed, ctx.device)
    score, offloaded = offload_frozen(cfg, policy, reward, work_dir / "offload")
    prompts = PromptSource(
        list(splits.rl["question"]), list(splits.rl["query"]), tok, int(cfg.ppo.max_prompt_length), seed
    )
    heldout = heldout_prompts(cfg, splits, tok) if int(cfg.ppo.eval_every) > 0 else None
    trainer = PPOTrainer(
        cfg.ppo,
        policy,
        tok,
        score,
        prompts,
        ctx.device,
        seed,
        checkpoint_dir=work_dir / "checkpoints",
        tracker=ctx.tracker,
        gold_scorer=gold,
        samples_path=ctx.run_dir / "ppo_samples.jsonl",
        mixed_precision=mixed,
        heldout=heldout,
        heldout_tokens=int(cfg.eval.max_new_tokens),
    )
    resumed_from = trainer.resume() if cfg.ppo.resume else 0
    try:
        history = trainer.train(on_step=lambda s: ctx.metrics.update({"ppo/last_step": s["ppo/step"]}))
    finally:
        for model in offloaded:  # this rank's copies of the offloaded weights
            model.close()
    trainer.save()
    # this rank's own figure (the published metrics are rank 0's): equal on all ranks when in sync
    ctx.metrics.update({"rank/ppo/trainable_norm": trainable_norm(policy)})
    if not dist.is_main:  # rank 0 alone saves the policy; the artifact store publishes its folder
        return {"ppo/steps": len(history)}

    with open(out_dir / "history.jsonl", "w") as fh:
        for row in history:
            fh.write(json.dumps(row) + "\n")
    if trainer.heldout_rows:
        with open(out_dir / HELDOUT_FILE, "w") as fh:
            for row in trainer.heldout_rows:
                fh.write(json.dumps(row) + "\n")
    save_policy(cfg, policy, tok, sft_path, work_dir, out_dir)
    metrics = summarize(history)
    metrics.update(heldout_summary(trainer.heldout_rows))
    if trainer.heldout_rows:
        metrics["time/ppo/heldout_s"] = round(trainer.heldout_seconds, 3)  # part of the build's time, not training
    # Sweep objective: the end reward at bounded KL (overshooting ppo.target costs 1:1).
    overshoot = max(0.0, metrics.get("objective/kl_end", 0.0) - float(cfg.ppo.target))
    metrics["ppo/objective"] = metrics.get("ppo/reward_mean_end", float("nan")) - overshoot
    metrics.update(
        {
            "ppo/resumed_from_step": resumed_from,
            "data/rl_prompts": len(prompts.query_ids),
            "data/skipped_prompts_too_long": prompts.skipped_too_long,
            "ppo/episodes": len(history) * int(cfg.ppo.batch_size) * dist.world_size,
            "ppo/cpu_matmul_onednn": float(cpu_matmul == "onednn"),
            **params,
        }
    )
    log.info(
        "PPO: reward %.3f -> %.3f, KL end %.3f",
        metrics.get("ppo/reward_mean_start", float("nan")),
        metrics.get("ppo/reward_mean_end", float("nan")),
        metrics.get("objective/kl_end", float("nan")),
    )
    return metrics


def run(cfg: Any, ctx: Any) -> float:
    _, metrics = pipeline.run_stage("ppo", cfg, ctx)
    return float(metrics.get("ppo/objective", float("nan")))
