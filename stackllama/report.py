"""Sweep summary: every job's metrics.json + overrides -> a table and a reward-vs-KL plot.

    python -m stackllama.report multirun_sweeps/2026-11-24/21-50-00

Writes ``summary.md``, ``summary.csv`` and ``frontier.png`` into the sweep folder and prints
the Markdown table. One row per job folder (any folder holding ``.hydra/overrides.yaml``),
whatever launcher or sweeper ran it. The table shows the overrides that vary across the
jobs (the swept values; the ones every job shares are listed once above it), the job's
status and objective, and the headline figures; the CSV holds every metric of every job.
Failed jobs stay in the table, marked ``failed`` and listed with their error below it; a job
stopped by SIGTERM/Ctrl-C (preemption, a time limit) is marked ``interrupted`` with its signal;
one still marked running is shown as ``running (or killed)`` (SIGKILL leaves no trace); a
job that left no ``metrics.json`` (killed before it started) is marked ``missing``. An
Optuna sweep's ``optimization_results.yaml`` (best parameters and value) is quoted.

The plot puts each finished PPO job at (KL to the reference at the end, reward model score
at the end), coloured by the first swept value, with the gold scorer's score (synthetic
data) as a second panel when present, and draws the frontier: the jobs no other job beats
on both (higher score at lower KL).

For jobs that ran the whole recipe (``stage=all``) a second table gives, job by job and as the
mean over jobs, each stage's wall time, the SFT perplexity before/after, the reward model's
held-out accuracy beside its gold ceiling, the PPO reward and gold score over the first and
last 10% of steps (± standard errors over their episodes) and the evaluation's win rates
over SFT (± binomial standard errors); ``ppo_curves.png`` draws every job's reward and gold
score per PPO step.
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

from stackllama import report_methods

HEADLINE = [
    "run/status",
    "run/objective",
    "ppo/reward_mean_start",
    "ppo/reward_mean_end",
    "objective/kl_end",
    "gold/score_start",
    "gold/score_end",
    "eval/win_rate_vs_sft",
    "eval/gold_win_rate_vs_sft",
    "eval/accuracy",
    "eval/perplexity",
    "ppo/skipped_batches",
    "upstream/sft/reused",
    "upstream/rm/reused",
    "time/total_s",
]
KL, REWARD, GOLD = "objective/kl_end", "ppo/reward_mean_end", "gold/score_end"
OVR = "override:"


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job folders of a Hydra multirun: those holding a .hydra/overrides.yaml."""
    return sorted((p.parent.parent for p in Path(sweep_dir).glob("**/.hydra/overrides.yaml")), key=_job_order)


def _job_order(path: Path) -> tuple[int, str]:
    head = path.name.split("_", 1)[0]
    return (int(head) if head.isdigit() else 1 << 30, path.name)


def _number(value: Any) -> float | None:
    """A metric as a float (metrics.json keeps NaN/inf as strings); None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)
    return None


def load_job(job_dir: Path) -> dict[str, Any]:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    head = job_dir.name.split("_", 1)[0]
    # "job" is Hydra's job number when the folder is <num>_<overrides>; "dir" the folder's name
    row: dict[str, Any] = {"job": head if head.isdigit() else job_dir.name, "dir": job_dir.name}
    for item in overrides:
        if "=" in item and not item.startswith("hydra."):
            key, value = item.split("=", 1)
            row[f"{OVR}{key.lstrip('+~')}"] = value
    metrics_file = job_dir / "metrics.json"
    if metrics_file.exists():
        row.update(json.loads(metrics_file.read_text()))
        if row.get("run/status") == "running":
            row["run/status"] = "running (or killed)"
    else:
        row["run/status"] = "missing"
        row["run/error"] = "no metrics.json (killed before it started?)"
    return row


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise FileNotFoundError(f"no Hydra job folders (.hydra/overrides.yaml) under {sweep_dir}")
    return [load_job(j) for j in jobs]


def swept_keys(rows: list[dict[str, Any]]) -> tuple[list[str], dict[str, str]]:
    """(override columns whose value differs across jobs, {key: value} shared by all jobs)."""
    keys = sorted({k for r in rows for k in r if k.startswith(OVR)})
    varying = [k for k in keys if len({r.get(k) for r in rows}) > 1]
    fixed = {k[len(OVR) :]: rows[0][k] for k in keys if k not in varying}
    return varying, fixed


def columns_for(rows: list[dict[str, Any]]) -> list[str]:
    varying, _ = swept_keys(rows)
    if len(rows) == 1:
        varying = sorted(k for k in rows[0] if k.startswith(OVR))
    metrics = [k for k in HEADLINE if any(k in r for r in rows)]
    return ["job", *varying, *metrics]


def _fmt(value: Any) -> str:
    if isinstance(value, str) and _is_long_float(value):
        value = float(value)  # e.g. an Optuna trial's 0.27891861692438913 (the CSV keeps every digit)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def _is_long_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return len(text) > 8 and any(c in text for c in ".eE")


def best_row(rows: list[dict[str, Any]], direction: str = "maximize") -> dict[str, Any] | None:
    done = [r for r in rows if r.get("run/status") == "completed" and _finite(r.get("run/objective"))]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda r: _number(r["run/objective"]))


def _finite(value: Any) -> bool:
    number = _number(value)
    return number is not None and math.isfinite(number)


def optimization_results(sweep_dir: Path) -> dict[str, Any] | None:
    path = Path(sweep_dir) / "optimization_results.yaml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def _direction(sweep_dir: Path) -> str:
    """The sweeper's direction (Optuna's ``hydra.sweeper.direction``), else maximize."""
    candidates = [Path(sweep_dir) / "multirun.yaml", *(j / ".hydra" / "hydra.yaml" for j in find_jobs(sweep_dir)[:1])]
    for path in candidates:
        if not path.exists():
            continue
        try:
            hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
        except yaml.YAMLError:
            continue
        direction = (hydra.get("sweeper") or {}).get("direction")
        if isinstance(direction, list) and direction:
            direction = direction[0]
        if direction in ("maximize", "minimize"):
            return direction
    return "maximize"


def to_markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(c.replace(OVR, "") for c in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    failed = [r for r in rows if r.get("run/status") != "completed"]
    notes = [f"- job {r['job']}: {r.get('run/status')} {r.get('run/error', '')}".rstrip() for r in failed]
    return "\n".join([head, sep, *body, "", *(["Failed jobs:", *notes, ""] if notes else [])])


def markdown_report(sweep_dir: Path, rows: list[dict[str, Any]], columns: list[str]) -> str:
    _, fixed = swept_keys(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[str(r.get("run/status"))] = counts.get(str(r.get("run/status")), 0) + 1
    lines = [
        f"# Sweep summary: {sweep_dir}",
        "",
        f"{len(rows)} jobs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        "",
    ]
    if fixed and len(rows) > 1:
        lines += ["Shared overrides: " + " ".join(f"`{k}={v}`" for k, v in fixed.items()), ""]
    lines.append(to_markdown(rows, columns))
    recipe = recipe_table(rows)
    if recipe:
        lines += [recipe]
    best = best_row(rows, _direction(sweep_dir))
    if best is not None:
        lines += [
            f"Best objective ({_direction(sweep_dir)}): {_fmt(_number(best['run/objective']))} in job {best['job']}",
            "",
        ]
    optuna = optimization_results(sweep_dir)
    if optuna:
        lines += [
            "Optuna (optimization_results.yaml):",
            "",
            "```yaml",
            yaml.safe_dump(optuna, sort_keys=False).rstrip(),
            "```",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


# The whole recipe per job (stage=all): what each stage took and bought. (label, key, stderr key or None)
RECIPE = [
    ("SFT s", "time/stage/sft_s", None),
    ("RM s", "time/stage/rm_s", None),
    ("PPO s", "time/stage/ppo_s", None),
    ("eval s", "time/stage/eval_s", None),
    ("total s", "time/total_s", None),
    ("ppl before", "sft/eval/perplexity_before", None),
    ("ppl after", "sft/eval/perplexity", None),
    ("RM acc", "rm/eval/accuracy", None),
    ("gold ceiling", "rm/eval/gold_accuracy", None),
    ("PPO reward start", "ppo/reward_mean_start", "ppo/reward_mean_start_stderr"),
    ("PPO reward end", "ppo/reward_mean_end", "ppo/reward_mean_end_stderr"),
    ("gold start", "ppo/gold/score_start", "ppo/gold/score_start_stderr"),
    ("gold end", "ppo/gold/score_end", "ppo/gold/score_end_stderr"),
    ("win vs SFT (RM)", "eval/win_rate_vs_sft", "eval/win_rate_stderr"),
    ("win vs SFT (gold)", "eval/gold_win_rate_vs_sft", "eval/gold_win_rate_stderr"),
    ("RM-gold corr", "eval/rm_gold_corr", None),
]


def _with_stderr(row: dict[str, Any], key: str, err_key: str | None) -> str:
    value = _number(row.get(key))
    if value is None:
        return ""
    err = _number(row.get(err_key)) if err_key else None
    if err_key == "eval/gold_win_rate_stderr" and err is None and _finite(row.get("eval/num_questions")):
        err = math.sqrt(value * (1 - value) / _number(row["eval/num_questions"]))  # binomial, as the RM's
    return f"{value:.3g} ± {err:.2g}" if err is not None and math.isfinite(err) else f"{value:.4g}"


def recipe_table(rows: list[dict[str, Any]]) -> str:
    """One row per stage=all job (stage times, what each stage bought, start -> end with their
    standard errors) and the mean over jobs (± the std over jobs); "" when no job ran the recipe."""
    jobs = [r for r in rows if r.get("run/status") == "completed" and "time/stage/ppo_s" in r]
    if not jobs:
        return ""
    cols = [c for c in RECIPE if any(c[1] in r for r in jobs)]
    varying, _ = swept_keys(rows)
    head = ["job", *(k[len(OVR) :] for k in varying), *(c[0] for c in cols)]
    lines = [
        "## The recipe, job by job",
        "",
        "Start/end: the first and last 10% of PPO steps (± standard error over their episodes); win rates ± "
        "binomial standard error over the evaluation questions; the last row is the mean over jobs ± their std.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in jobs:
        cells = [str(r["job"]), *(_fmt(r.get(k)) for k in varying), *(_with_stderr(r, k, e) for _, k, e in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    means = []
    for _, key, _ in cols:
        vals = [_number(r.get(key)) for r in jobs if _finite(r.get(key))]
        if not vals:
            means.append("")
            continue
        mu = sum(vals) / len(vals)
        sd = math.sqrt(sum((v - mu) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        means.append(f"{mu:.3g} ± {sd:.2g}")
    lines.append("| " + " | ".join([f"mean of {len(jobs)}", *([""] * len(varying)), *means]) + " |")
    return "\n".join(lines) + "\n"


def ppo_history(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-step PPO history of a job's policy artifact (``history.jsonl``), when it is on disk."""
    folder = row.get("upstream/ppo/path") or (row.get("artifact/path") if row.get("run/stage") == "ppo" else None)
    path = Path(str(folder)) / "history.jsonl" if folder else None
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_ppo_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Reward-model score and gold score per PPO step, one line per job, ± the step's standard error."""
    curves = [(r, ppo_history(r)) for r in rows]
    curves = [(r, h) for r, h in curves if h]
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("env/reward_mean", "env/reward_std", "reward model score")]
    if all("gold/score_mean" in h[0] for _, h in curves):
        panels.append(("gold/score_mean", "gold/score_std", "gold score (synthetic data)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    varying, _ = swept_keys(rows)
    for ax, (key, std_key, label) in zip(axes[0], panels):
        for r, hist in curves:
            xs = [h.get("ppo/step", i + 1) for i, h in enumerate(hist)]
            ys = [h[key] for h in hist]
            se = [h.get(std_key, 0.0) / math.sqrt(max(h.get("env/episodes", 1.0), 1.0)) for h in hist]
            name = ",".join(f"{k[len(OVR) :]}={r.get(k)}" for k in varying) or f"job {r['job']}"
            (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
            ax.fill_between(
                xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)], color=line.get_color(), alpha=0.15
            )
        ax.set_xlabel("PPO step")
        ax.set_ylabel(f"{label}, batch mean ± stderr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("PPO along training")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points no other beats on both axes (lower-or-equal KL and higher-or-equal score, one strictly),
    sorted by KL: the reward-vs-KL frontier."""
    front = []
    for kl, score in points:
        dominated = any(k <= kl and s >= score and (k < kl or s > score) for k, s in points)
        if not dominated:
            front.append((kl, score))
    return sorted(set(front))


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Score at the end of PPO against KL at the end, one point per finished job."""
    done = [r for r in rows if _finite(r.get(KL)) and _finite(r.get(REWARD))]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    varying, _ = swept_keys(rows)
    color_key = varying[0] if varying else None
    values = sorted({r.get(color_key) for r in done}, key=_sort_value) if color_key else [None]
    continuous = color_key is not None and len(values) > 6 and all(_sort_value(v)[0] == 0 for v in values)
    if continuous:  # e.g. an Optuna search: a colour scale instead of one legend entry per value
        norm = matplotlib.colors.Normalize(min(float(v) for v in values), max(float(v) for v in values))
        colors = {v: plt.get_cmap("viridis")(norm(float(v))) for v in values}
    else:
        cmap = plt.get_cmap("viridis", max(len(values), 2))
        colors = {v: cmap(i) for i, v in enumerate(values)}
    short = {k: k[len(OVR) :].split(".")[-1] for k in varying}
    panels = [(REWARD, "reward model score at the end")]
    if all(_finite(r.get(GOLD)) for r in done):
        panels.append((GOLD, "gold score at the end (synthetic data)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.6), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        points = [(_number(r[KL]), _number(r[key])) for r in done]
        for r, (x, y) in zip(done, points):
            value = r.get(color_key) if color_key else None
            ax.scatter([x], [y], color=colors[value], s=42, edgecolor="black", linewidth=0.5, zorder=3)
            label = ",".join(f"{short[k]}={_fmt(r.get(k))}" for k in varying[1:])
            if label:
                ax.annotate(label, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto_front(points)
        if len(front) > 1:  # best score reachable at each KL budget: a staircase through the front
            ax.plot(
                *zip(*front),
                color="tab:red",
                linestyle="--",
                linewidth=1,
                zorder=2,
                drawstyle="steps-post",
                label="frontier (best score at a KL budget)",
            )
        elif front:
            ax.scatter(
                *zip(*front),
                facecolor="none",
                edgecolor="tab:red",
                s=130,
                zorder=2,
                label="frontier (dominates the rest)",
            )
        if color_key and not continuous:
            for v in values:
                ax.scatter(
                    [],
                    [],
                    color=colors[v],
                    edgecolor="black",
                    linewidth=0.5,
                    label=f"{color_key[len(OVR) :]}={_fmt(v)}",
                )
        if continuous:
            mappable = matplotlib.cm.ScalarMappable(norm=norm, cmap="viridis")
            fig.colorbar(mappable, ax=ax, label=color_key[len(OVR) :])
        ax.xaxis.set_major_locator(MaxNLocator(5))
        for axis in (ax.xaxis, ax.yaxis):  # short tick labels, no offset text over the axis label
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax.set_xlabel("KL to the reference at the end of PPO (objective/kl_end)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    missing = len(rows) - len(done)
    fig.suptitle(
        "Reward vs KL across the sweep" + (f" ({missing} job(s) without PPO figures not shown)" if missing else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _sort_value(value: Any) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def write_summary(sweep_dir: Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    columns = columns_for(rows)
    out = {"markdown": sweep_dir / "summary.md", "csv": sweep_dir / "summary.csv"}
    curves = plot_ppo_curves(rows, sweep_dir / "ppo_curves.png")
    text = markdown_report(sweep_dir, rows, columns)
    if curves is not None:
        out["curves"] = curves
        text += "\n![PPO along training](ppo_curves.png)\n"
    methods = report_methods.methods_table(rows)
    if methods:
        text += "\n" + methods
        figure = report_methods.plot_methods_kl(rows, sweep_dir / "methods_kl.png")
        if figure is not None:
            out["methods"] = figure
            text += "\n![Proxy and gold score against sqrt(KL)](methods_kl.png)\n"
    out["markdown"].write_text(text)
    everything = columns + sorted({k for r in rows for k in r} - set(columns))
    with open(out["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=everything, extrasaction="ignore")
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
