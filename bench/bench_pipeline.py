"""Wall time of the whole recipe from nothing: ``python -m stackllama stage=all logger=none``.

    python bench/bench_pipeline.py                 # the embedded default (~15 min on 2 cores)
    python bench/bench_pipeline.py ppo.total_episodes=64    # extra Hydra overrides (smoke test)

Runs the CLI in a subprocess with a fresh ``artifacts_dir`` and a fresh, empty
``STACKLLAMA_CACHE`` (so the base model is resolved and converted again, as on a new
machine), both in temp dirs removed afterwards. Reports the total wall time of the command
and the per-stage times the run records in its metrics.json (``time/stage/<name>_s``).
Writes bench/results/pipeline.json; the CLI's output goes to bench/results/pipeline.log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "pipeline.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for the CLI")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    log_path = common.RESULTS / "pipeline.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
        tmp = Path(tmp)
        artifacts, cache, run_dir = tmp / "artifacts", tmp / "cache", tmp / "run"
        cache.mkdir()
        cmd = [
            sys.executable,
            "-m",
            "stackllama",
            "stage=all",
            "logger=none",
            f"artifacts_dir={artifacts}",
            f"hydra.run.dir={run_dir}",
            *args.overrides,
        ]
        env = {
            **os.environ,
            "STACKLLAMA_CACHE": str(cache),
            "WANDB_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1",
        }
        common.log("running " + " ".join(cmd[1:]) + f" (STACKLLAMA_CACHE={cache})")
        started = time.perf_counter()
        with open(log_path, "w") as fh:
            proc = subprocess.run(
                cmd, cwd=common.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=args.timeout
            )
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(
                f"pipeline failed (rc={proc.returncode}) after {wall:.0f}s; see {log_path}:\n"
                f"{log_path.read_text()[-3000:]}"
            )
        metrics_path = run_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    stages = {k: v for k, v in metrics.items() if k.startswith("time/")}
    headline = {
        k: metrics[k]
        for k in (
            "sft/eval/perplexity_before",
            "sft/eval/perplexity",
            "rm/eval/accuracy",
            "rm/eval/gold_accuracy",
            "ppo/reward_mean_start",
            "ppo/reward_mean_end",
            "ppo/gold/score_start",
            "ppo/gold/score_end",
            "ppo/objective/kl_end",
            "eval/win_rate_vs_sft",
            "eval/win_rate_stderr",
            "eval/gold_win_rate_vs_sft",
            "eval/reward_mean_ppo",
            "eval/reward_mean_sft",
            "eval/gold_mean_ppo",
            "eval/gold_mean_sft",
            "eval/kl_mean",
        )
        if k in metrics
    }
    print(f"\nPipeline (stage=all, embedded default, empty cache): {wall:.0f} s = {wall / 60:.1f} min")
    for k, v in stages.items():
        print(f"  {k}: {v:.0f} s" if isinstance(v, (int, float)) else f"  {k}: {v}")
    payload = {
        "benchmark": "pipeline_wall_time",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "command": "python -m stackllama stage=all logger=none " + " ".join(args.overrides),
        "fresh_artifacts_dir": True,
        "fresh_cache": True,
        "wall_s": wall,
        "stage_times_s": stages,
        "headline_metrics": headline,
        "machine": {**common.machine_info(), "load_average_at_end": common.load_average()},
    }
    common.write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
