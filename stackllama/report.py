"""Sweep summary: every job's metrics.json + overrides -> a table and a reward-vs-KL plot.

    python -m stackllama.report multirun_sweeps/2026-11-24/21-50-00

Writes ``summary.md``, ``summary.csv`` and ``frontier.png`` into the sweep folder and prints
the Markdown table. Failed jobs stay in the table, marked with their error.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import yaml

HEADLINE = [
    "run/status",
    "ppo/reward_mean_start", "ppo/reward_mean_end", "objective/kl_end", "gold/score_start", "gold/score_end",
    "eval/win_rate_vs_sft", "eval/gold_win_rate_vs_sft", "eval/accuracy", "eval/perplexity",
    "ppo/skipped_batches", "time/total_s",
]


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders of a Hydra multirun: those holding a .hydra/overrides.yaml."""
    return sorted((p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml")), key=_job_order)


def _job_order(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, path.name)


def load_job(job_dir: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    row: dict[str, Any] = {"job": job_dir.name}
    for item in overrides:
        if "=" in item and not item.startswith("hydra."):
            key, value = item.split("=", 1)
            row[f"override:{key.lstrip('+~')}"] = value
    metrics_file = job_dir / "metrics.json"
    if metrics_file.exists():
        row.update(json.loads(metrics_file.read_text()))
    else:
        row["run/status"] = "missing metrics.json (crashed before start?)"
    return row


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders (.hydra/overrides.yaml) under {sweep_dir}")
    return [load_job(j) for j in jobs]


def columns_for(rows: list[dict[str, Any]]) -> list[str]:
    overrides = sorted({k for r in rows for k in r if k.startswith("override:")})
    metrics = [k for k in HEADLINE if any(k in r for r in rows)]
    return ["job", *overrides, *metrics]


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(c.replace("override:", "") for c in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    failed = [r for r in rows if r.get("run/status") != "completed"]
    notes = [f"- job {r['job']}: {r.get('run/status')} {r.get('run/error', '')}".rstrip() for r in failed]
    return "\n".join([head, sep, *body, "", *(["Failed jobs:", *notes] if notes else [])]) + "\n"


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Reward (and gold score) at the end of PPO against KL at the end, one point per job."""
    done = [r for r in rows if isinstance(r.get("objective/kl_end"), (int, float))
            and isinstance(r.get("ppo/reward_mean_end"), (int, float))]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    xs = [r["objective/kl_end"] for r in done]
    ax.scatter(xs, [r["ppo/reward_mean_end"] for r in done], label="reward model score", color="tab:blue")
    if all(isinstance(r.get("gold/score_end"), (int, float)) for r in done):
        ax.scatter(xs, [r["gold/score_end"] for r in done], label="gold score", color="tab:orange", marker="s")
    for r, x in zip(done, xs):
        label = ",".join(f"{k.split(':', 1)[1].split('.')[-1]}={v}" for k, v in r.items() if k.startswith("override:"))
        ax.annotate(label, (x, r["ppo/reward_mean_end"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("KL to reference at the end of PPO (objective/kl_end)")
    ax.set_ylabel("score at the end of PPO")
    ax.set_title("Reward vs KL across the sweep")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_summary(sweep_dir: Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    columns = columns_for(rows)
    out = {"markdown": sweep_dir / "summary.md", "csv": sweep_dir / "summary.csv"}
    out["markdown"].write_text(f"# Sweep summary: {sweep_dir}\n\n{len(rows)} jobs\n\n" + to_markdown(rows, columns))
    with open(out["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    png = plot_frontier(rows, sweep_dir / "frontier.png")
    if png is not None:
        out["plot"] = png
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, help="a multirun folder (multirun_sweeps/<date>/<time>)")
    args = parser.parse_args(argv)
    outputs = write_summary(args.sweep_dir)
    print(outputs["markdown"].read_text())
    for kind, path in outputs.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
