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

log = logging.getLogger(__name__)


def prefixed(stage: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """``stage/<key>`` for every metric (keys already under ``stage/`` are kept as they are)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (dict, list)):
            continue
        out[key if key.startswith(f"{stage}/") else f"{stage}/{key}"] = value
    return out


def run(cfg: Any, ctx: Any) -> float:
    from stackllama.pipeline import plan, resolve
    from stackllama.stages.eval import evaluate

    todo = plan("eval", cfg)  # sft -> rm -> ppo (or dpo: eval.policy), less what explicit paths replace
    summary = []

    def on_ready(stage: str, folder: Path, manifest: dict, reused: bool, seconds: float) -> None:
        ctx.metrics.update(
            {
                **prefixed(stage, dict(manifest.get("metrics", {}))),
                f"upstream/{stage}/key": folder.name,
                f"time/stage/{stage}_s": round(seconds, 3),
                f"time/stage/{stage}_build_s": manifest.get("build_seconds"),
            }
        )
        how = "reused (built earlier with the same settings)" if reused else f"built in {seconds:.0f} s"
        log.info("all: %s artifact %s (%d/%d): %s", stage, folder, todo.index(stage) + 1, len(todo) + 1, how)
        summary.append(f"{stage}: {'reused' if reused else 'built'}")

    log.info("all: %s, then eval", " -> ".join(todo))
    inputs = resolve("eval", cfg, ctx, on_ready=on_ready)
    log.info("all: artifacts ready (%s); evaluating", ", ".join(summary) or "every model given explicitly")
    started = time.time()
    objective = evaluate(cfg, ctx, inputs[str(cfg.eval.policy)], inputs["sft"], inputs["rm"])
    ctx.metrics.update({"time/stage/eval_s": round(time.time() - started, 3)})
    return objective


__all__ = ["run", "prefixed"]
