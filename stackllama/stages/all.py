"""Stage 'all': the whole recipe in one command, sft -> rm -> ppo -> eval.

``python -m stackllama stage=all`` (what ``make train`` runs) builds each artifact this
config needs, or reuses it when an earlier run with the same settings built it (the log
and ``upstream/<stage>/reused`` say which), then evaluates the PPO policy against the SFT
model (``stackllama.stages.eval``). A stage whose model is given explicitly
(``ppo.policy_path``, ``ppo.reward_model_path``, ``rm.model_path``) is not built.

``metrics.json`` holds the evaluation's ``eval/...`` figures, every upstream artifact's
metrics under its stage's prefix (``sft/eval/perplexity``, ``rm/eval/accuracy``,
``ppo/reward_mean_end``, ``ppo/objective/kl_end``: a key that already starts with the
stage's name keeps it), and wall times ``time/stage/<name>_s``. Re-running the same
command resumes: finished artifacts are reused, an interrupted one continues from its
checkpoints. The objective is ``eval/win_rate_vs_sft``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from stackllama import artifacts

log = logging.getLogger(__name__)

ORDER = ("sft", "rm", "ppo")


def needed(cfg: Any) -> dict[str, bool]:
    """Which artifacts this config builds (explicit model paths replace them)."""
    need_rm = not cfg.ppo.reward_model_path
    need_sft = not cfg.ppo.policy_path or (need_rm and not cfg.rm.model_path)
    return {"sft": need_sft, "rm": need_rm, "ppo": True}


def prefixed(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``stage/<key>`` for every metric (keys already under ``stage/`` are kept as they are)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            continue
        out[key if key.startswith(f"{stage}/") else f"{stage}/{key}"] = value
    return out


def run(cfg: Any, ctx: Any) -> float:
    from stackllama.stages import get_builder
    from stackllama.stages.eval import evaluate

    need = needed(cfg)
    paths: dict[str, Path] = {}
    observed: dict[str, Any] = {}
    summary = []
    for stage in ORDER:
        started = time.time()
        if not need[stage]:
            explicit = cfg.ppo.policy_path if stage == "sft" else cfg.ppo.reward_model_path
            log.info("all: %s not built: using the explicit model %s", stage, explicit)
            paths[stage] = artifacts.require(stage, cfg, ctx, explicit=explicit)
            observed.update(
                {
                    f"upstream/{stage}/path": str(paths[stage]),
                    f"upstream/{stage}/reused": True,
                    f"upstream/{stage}/explicit": True,
                }
            )
            summary.append(f"{stage}: explicit")
            continue
        log.info("all: stage %s (%d/%d)", stage, ORDER.index(stage) + 1, len(ORDER) + 1)
        folder, manifest, reused = artifacts.ensure(stage, cfg, ctx, get_builder(stage))
        elapsed = round(time.time() - started, 3)
        paths[stage] = folder
        observed.update(
            {
                f"upstream/{stage}/path": str(folder),
                f"upstream/{stage}/key": folder.name,
                f"upstream/{stage}/reused": reused,
            }
        )
        ctx.metrics.update(
            {
                **prefixed(stage, dict(manifest.get("metrics", {}))),
                **observed,
                f"time/stage/{stage}_s": elapsed,
                f"time/stage/{stage}_build_s": manifest.get("build_seconds"),
            }
        )
        how = "reused (built earlier with the same settings)" if reused else f"built in {elapsed:.0f} s"
        log.info("all: %s artifact %s: %s", stage, folder, how)
        summary.append(f"{stage}: {'reused' if reused else 'built'}")

    # explicit paths for the policy / reward model also stand in for the eval's comparison
    sft_path = Path(cfg.ppo.policy_path) if cfg.ppo.policy_path else paths["sft"]
    rm_path = Path(cfg.ppo.reward_model_path) if cfg.ppo.reward_model_path else paths["rm"]
    ctx.metrics.update(observed)  # the PPO build re-required SFT/RM as "reused": keep what this run saw
    log.info("all: artifacts ready (%s); evaluating", ", ".join(summary))
    started = time.time()
    objective = evaluate(cfg, ctx, paths["ppo"], sft_path, rm_path)
    ctx.metrics.update({"time/stage/eval_s": round(time.time() - started, 3)})
    return objective


__all__ = ["run", "needed", "prefixed", "ORDER"]
