"""The evaluation report: ``report.md`` (and ``report.html``) in the run dir, with its plots.

``write_report`` puts in one place what a reader needs to judge a PPO run:

* the figures: RM-judged win rate of PPO over SFT, reward, gold score (synthetic data),
  KL to the reference, response lengths and reward-hacking indicators, SFT beside PPO;
* where they came from: each upstream artifact's path, key, and whether it was reused;
* side-by-side samples (question | SFT response | PPO response | rewards | gold);
* plots from the PPO run's ``history.jsonl``: reward (and gold score) per step, KL and
  the KL coefficient per step, and the per-question eval rewards of SFT vs PPO.

The plots are PNGs under ``figures/`` drawn with matplotlib's Agg canvas (no display, no
pyplot state); the same table and images go to the run's tracker.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

FIG_DIR = "figures"
HEADLINES = {
    "sft": ("eval/perplexity", "eval/perplexity_before", "train/loss", "train/steps"),
    "rm": ("eval/accuracy", "eval/accuracy_before", "eval/gold_accuracy", "eval/margin", "train/steps"),
    "ppo": (
        "ppo/steps",
        "ppo/reward_mean_start",
        "ppo/reward_mean_end",
        "gold/score_start",
        "gold/score_end",
        "objective/kl_end",
        "objective/kl_coef_end",
        "hack/frac_hacking_end",
    ),
    "dpo": ("eval/implicit_reward_accuracy", "eval/implicit_reward_margin", "train/loss", "train/steps"),
}
COLORS = {"sft": "#1f77b4", "ppo": "#d62728", "gold": "#2ca02c", "coef": "#7f7f7f"}


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"
    return str(value)


def md_cell(text: Any, limit: int | None = None) -> str:
    """Text safe inside a markdown table cell: one line, no pipes or stray markup."""
    s = str(text)
    if limit is not None and len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    s = html.escape(s, quote=False).replace("`", "&#96;").replace("|", "&#124;")
    s = s.replace("\r\n", "\n").replace("\n", "<br>")
    return s or " "


def md_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# --------------------------------------------------------------------------------------
# History and plots
# --------------------------------------------------------------------------------------


def load_history(path: Path) -> list[dict[str, Any]]:
    """Rows of a PPO ``history.jsonl`` (empty when missing; bad lines skipped)."""
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("skipping a malformed line in %s", path)
    return rows


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            xs.append(float(row.get("ppo/step", i + 1)))
            ys.append(float(value))
    return xs, ys


def smooth(ys: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def _window(n: int) -> int:
    return max(1, n // 10) if n >= 20 else 1


def _new_figure(width: float = 7.5, height: float = 4.2):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # PPO steps are whole numbers
    return fig, ax


def _line(ax: Any, xs: list[float], ys: list[float], color: str, label: str) -> None:
    """Raw values thin (with markers when few), a moving average on top when many."""
    w = _window(len(ys))
    marker = "o" if len(ys) <= 30 else None
    if w > 1:
        ax.plot(xs, ys, color=color, alpha=0.3, linewidth=1)
        ax.plot(xs, smooth(ys, w), color=color, linewidth=2, label=f"{label} (moving avg, {w} steps)")
    else:
        ax.plot(xs, ys, color=color, linewidth=2, marker=marker, markersize=4, label=label)


def plot_reward(history: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Reward-model score per PPO step (mean, ±1 std band) and the gold score when logged."""
    xs, ys = _series(history, "env/reward_mean")
    if not xs:
        return None
    fig, ax = _new_figure()
    _, std = _series(history, "env/reward_std")
    if len(std) == len(ys):
        w = _window(len(ys))
        mid, spread = smooth(ys, w), smooth(std, w)  # the band follows the drawn (smoothed) line
        ax.fill_between(
            xs,
            [y - s for y, s in zip(mid, spread)],
            [y + s for y, s in zip(mid, spread)],
            color=COLORS["ppo"],
            alpha=0.12,
            linewidth=0,
            label="reward ± 1 std (batch)",
        )
    _line(ax, xs, ys, COLORS["ppo"], "reward-model score (mean)")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("reward-model score", color=COLORS["ppo"])
    handles, labels = ax.get_legend_handles_labels()
    gx, gy = _series(history, "gold/score_mean")
    if gx:
        ax2 = ax.twinx()
        _line(ax2, gx, gy, COLORS["gold"], "gold score (mean)")
        ax2.set_ylabel("gold score (hidden true quality)", color=COLORS["gold"])
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_title("PPO: proxy reward" + (" vs gold score" if gx else "") + " during training")
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, loc="best", fontsize=8, framealpha=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_kl(history: Sequence[Mapping[str, Any]], path: Path, target: float | None = None) -> Path | None:
    """KL(policy || reference) per response per PPO step, and the KL coefficient beta."""
    xs, ys = _series(history, "objective/kl")
    if not xs:
        return None
    fig, ax = _new_figure()
    _line(ax, xs, ys, COLORS["ppo"], "KL to reference (sum over response tokens)")
    if target is not None:
        ax.axhline(target, color=COLORS["ppo"], linestyle="--", linewidth=1, label=f"KL target ({target:g})")
    ax.set_xlabel("PPO step")
    ax.set_ylabel("KL (nats per response)", color=COLORS["ppo"])
    handles, labels = ax.get_legend_handles_labels()
    cx, cy = _series(history, "objective/kl_coef")
    if cx:
        ax2 = ax.twinx()
        ax2.plot(
            cx,
            cy,
            color=COLORS["coef"],
            linewidth=1.5,
            marker="s" if len(cy) <= 30 else None,
            markersize=3,
            label="KL coefficient β",
        )
        ax2.set_ylabel("KL coefficient β", color=COLORS["coef"])
        ax2.set_ylim(0, max(max(cy), 1e-6) * 1.25)  # beta > 0: from zero, no offset notation
        ax2.ticklabel_format(axis="y", useOffset=False, style="plain")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.set_title("PPO: KL to the SFT reference and its coefficient")
    ax.grid(True, alpha=0.3)
    ax.legend(handles, labels, loc="best", fontsize=8, framealpha=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def plot_eval_scores(records: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Per question: SFT score (x) against PPO score (y); above the diagonal PPO wins."""
    if not records:
        return None
    from matplotlib.figure import Figure

    panels = [("reward", "reward model")]
    if all("gold_ppo" in r for r in records):
        panels.append(("gold", "gold scorer"))
    fig = Figure(figsize=(4.2 * len(panels) + 0.6, 4.2), dpi=110, layout="constrained")
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        x = [float(r[f"{key}_sft"]) for r in records]
        y = [float(r[f"{key}_ppo"]) for r in records]
        lo, hi = min(x + y), max(x + y)
        pad = (hi - lo) * 0.08 or 0.5
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color=COLORS["coef"], linestyle="--", linewidth=1)
        wins = [b > a for a, b in zip(x, y)]
        ax.scatter(
            [a for a, w in zip(x, wins) if w],
            [b for b, w in zip(y, wins) if w],
            s=22,
            color=COLORS["ppo"],
            label=f"PPO better ({sum(wins)})",
        )
        ax.scatter(
            [a for a, w in zip(x, wins) if not w],
            [b for b, w in zip(y, wins) if not w],
            s=22,
            color=COLORS["sft"],
            label=f"SFT better or tie ({len(wins) - sum(wins)})",
        )
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"SFT response ({title})")
        ax.set_ylabel(f"PPO response ({title})")
        ax.set_title(f"Held-out questions: {title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", fontsize=8, framealpha=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------


def figures_rows(m: Mapping[str, Any]) -> list[list[str]]:
    """SFT | PPO rows of the main figures table."""

    def pair(label: str, key: str, digits: int = 3, std: str | None = None) -> list[str] | None:
        a, b = m.get(f"{key}_sft"), m.get(f"{key}_ppo")
        if a is None and b is None:
            return None
        if std:
            sa, sb = m.get(f"{std}_sft"), m.get(f"{std}_ppo")
            return [label, f"{fmt(a, digits)} ± {fmt(sa, digits)}", f"{fmt(b, digits)} ± {fmt(sb, digits)}"]
        return [label, fmt(a, digits), fmt(b, digits)]

    rows = [
        pair("reward-model score (mean ± std)", "eval/reward_mean", std="eval/reward_std"),
        ["gold score (mean)", fmt(m.get("eval/gold_mean_sft")), fmt(m.get("eval/gold_mean_ppo"))]
        if "eval/gold_mean_ppo" in m
        else None,
        pair("response length (tokens)", "eval/response_len", 1),
        pair("response length (characters)", "eval/response_chars", 1),
        pair("repeat-dominated responses (fraction)", "eval/hack/frac_repeat_dominated"),
        pair("fence-spam responses (fraction)", "eval/hack/frac_fence_spam"),
        pair("either hacking sign (fraction)", "eval/hack/frac_hacking"),
    ]
    return [r for r in rows if r is not None]


def comparison_rows(m: Mapping[str, Any]) -> list[list[str]]:
    rows = [
        [
            "win rate of PPO over SFT, reward model (ties ½)",
            "`eval/win_rate_vs_sft`",
            f"{fmt(m.get('eval/win_rate_vs_sft'))} ± {fmt(m.get('eval/win_rate_stderr'))}",
        ],
        ["mean reward margin (PPO − SFT)", "`eval/reward_margin_mean`", fmt(m.get("eval/reward_margin_mean"))],
    ]
    if "eval/gold_win_rate_vs_sft" in m:
        rows += [
            [
                "win rate of PPO over SFT, gold scorer",
                "`eval/gold_win_rate_vs_sft`",
                fmt(m.get("eval/gold_win_rate_vs_sft")),
            ],
            ["mean gold margin (PPO − SFT)", "`eval/gold_margin_mean`", fmt(m.get("eval/gold_margin_mean"))],
            [
                "proxy − gold win-rate gap (> 0: the RM overrates PPO)",
                "`eval/proxy_gold_win_gap`",
                fmt(m.get("eval/proxy_gold_win_gap")),
            ],
            [
                "correlation of RM and gold scores (all responses)",
                "`eval/rm_gold_corr`",
                fmt(m.get("eval/rm_gold_corr")),
            ],
        ]
    rows += [
        ["KL(PPO ‖ SFT) per response, on PPO's responses", "`eval/kl_mean`", fmt(m.get("eval/kl_mean"))],
        ["KL per token", "`eval/kl_per_token`", fmt(m.get("eval/kl_per_token"), 4)],
        [
            "identical PPO and SFT responses (fraction)",
            "`eval/frac_identical_responses`",
            fmt(m.get("eval/frac_identical_responses")),
        ],
        ["questions", "`eval/num_questions`", fmt(m.get("eval/num_questions"))],
    ]
    return rows


def method_label(cfg: Any) -> str:
    """The method that trained the policy under test: DPO, or PPO / RLOO / GRPO (``ppo.advantage``)."""
    if str(cfg.eval.policy) != "ppo":
        return str(cfg.eval.policy).upper()
    return "PPO" if str(cfg.ppo.advantage) == "gae" else str(cfg.ppo.advantage).upper()


def relabel_text(text: str, cfg: Any) -> str:
    """The report names the policy under test by its method (``method_label``): written for PPO,
    "PPO" reads "DPO" or "RLOO" where such a policy is judged. (The figures' labels are drawn before.)"""
    label = method_label(cfg)
    return text if label == "PPO" else text.replace("PPO", label)


def upstream_rows(upstream: Mapping[str, Path], reused: Mapping[str, Any]) -> list[list[str]]:
    from stackllama.artifacts import is_trusted, read_manifest

    rows = []
    for stage in ("sft", "rm", "ppo", "dpo"):
        if stage not in upstream:
            continue
        folder = Path(upstream[stage])
        key, built, heads = "explicit path", "", []
        if is_trusted(folder):
            manifest = read_manifest(folder)
            key = str(manifest.get("key", folder.name))
            built = f"{manifest.get('created', '?')}, {fmt(manifest.get('build_seconds'), 1)} s"
            metrics = manifest.get("metrics", {})
            heads = [f"{k} {fmt(metrics[k])}" for k in HEADLINES[stage] if k in metrics]
        state = reused.get(stage)
        how = "reused" if state is True else "built now" if state is False else "?"
        if not is_trusted(folder):
            how = "given (explicit path)"
        rows.append([stage, f"`{folder}`", f"`{key}`", how, built or " ", "; ".join(heads) or " "])
    return rows


def sample_rows(records: Sequence[Mapping[str, Any]], n: int) -> tuple[list[str], list[list[str]]]:
    has_gold = bool(records) and all("gold_ppo" in r for r in records)
    columns = ["#", "question", "SFT response", "PPO response", "reward SFT → PPO"]
    if has_gold:
        columns.append("gold SFT → PPO")
    rows = []
    for i, r in enumerate(records[: max(int(n), 0)]):
        row = [
            str(i + 1),
            md_cell(r["question"], 400),
            md_cell(r["sft"]),
            md_cell(r["ppo"]),
            f"{fmt(r['reward_sft'])} → {fmt(r['reward_ppo'])}",
        ]
        if has_gold:
            row.append(f"{fmt(r['gold_sft'])} → {fmt(r['gold_ppo'])}")
        rows.append(row)
    return columns, rows


def kl_figure(cfg: Any, metrics: Mapping[str, Any], upstream: Mapping[str, Path], fig_dir: Path) -> list:
    """The proxy and gold score against sqrt(KL to SFT): the policy's held-out curve along training
    (``ppo.eval_every``), best-of-n (``eval.best_of_n``), a DPO policy's end point; [] without any."""
    from stackllama.report_methods import plot_methods_kl
    from stackllama.stages.eval import relabel

    policy = str(cfg.eval.policy)
    row = {**relabel(metrics, policy), "run/status": "completed", "override:method": policy}  # (this run: "running")
    row.update({f"upstream/{name}/path": str(path) for name, path in upstream.items()})
    fig_dir.mkdir(parents=True, exist_ok=True)
    path = plot_methods_kl([row], fig_dir / "kl_frontier.png")
    caption = "Proxy (RM) and gold score against sqrt(KL to SFT): along training, best-of-n"
    return [("eval/kl_frontier", caption, path)] if path is not None else []


def draw_figures(
    cfg: Any, history: list, records: Sequence[Mapping[str, Any]], figs: Path
) -> list[tuple[str, str, Path]]:
    """The report's figures as ``(tracker name, caption, path)``; a figure that fails is logged and left out."""
    adaptive = cfg.ppo.kl_coef is None
    images: list[tuple[str, str, Path]] = []
    for name, caption, maker in (
        (
            "eval/ppo_reward_curve",
            "Reward-model score (and gold score) per PPO step",
            lambda: plot_reward(history, figs / "ppo_reward.png"),
        ),
        (
            "eval/ppo_kl_curve",
            "KL to the reference and the KL coefficient per PPO step",
            lambda: plot_kl(history, figs / "ppo_kl.png", float(cfg.ppo.target) if adaptive else None),
        ),
        (
            "eval/scores_sft_vs_ppo",
            "Held-out questions: SFT vs PPO score per question",
            lambda: plot_eval_scores(records, figs / "eval_scores.png"),
        ),
    ):
        try:
            path = maker()
        except Exception:  # a plot must never sink the evaluation it illustrates
            log.exception("could not draw %s", name)
            path = None
        if path is not None:
            images.append((name, caption, path))
    return images


def proxy_vs_truth(metrics: Mapping[str, Any]) -> list[str]:
    """One line saying whether the reward model over- or underrates PPO against the gold scorer."""
    gap = metrics.get("eval/proxy_gold_win_gap")
    if "eval/gold_win_rate_vs_sft" not in metrics or not (isinstance(gap, float) and math.isfinite(gap)):
        return []
    if gap > 0.1:
        verdict = "the reward model overrates the PPO policy (reward over-optimization)"
    elif gap < -0.1:
        verdict = "the reward model underrates the PPO policy"
    else:
        verdict = "the reward model and the gold scorer broadly agree"
    return [
        f"Proxy vs truth: RM win rate {fmt(metrics.get('eval/win_rate_vs_sft'))}, gold win rate "
        f"{fmt(metrics.get('eval/gold_win_rate_vs_sft'))}: {verdict}.",
        "",
    ]


def log_to_tracker(tracker: Any, records: Sequence[Mapping[str, Any]], n_samples: int, images: list) -> None:
    """The sample table and the figures, to W&B / TensorBoard."""
    gold = bool(records) and "gold_ppo" in records[0]
    cols = ["#", "question", "sft", "ppo", "reward_sft", "reward_ppo"] + (["gold_sft", "gold_ppo"] if gold else [])
    rows = [
        [i + 1, r["question"], r["sft"], r["ppo"], r["reward_sft"], r["reward_ppo"]]
        + ([r["gold_sft"], r["gold_ppo"]] if gold else [])
        for i, r in enumerate(records[:n_samples])
    ]
    tracker.log_table("eval/samples", cols, rows)
    for name, _, path in images:
        tracker.log_image(name, path)


def write_report(
    cfg: Any,
    run_dir: Path,
    metrics: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    upstream: Mapping[str, Path],
    reused: Mapping[str, Any] | None = None,
    tracker: Any = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` in ``run_dir``; returns report.md."""
    run_dir = Path(run_dir)
    reused = dict(reused or {})
    history = load_history(Path(upstream["ppo"]) / "history.jsonl") if "ppo" in upstream else []
    images = draw_figures(cfg, history, records, run_dir / FIG_DIR)
    images += kl_figure(cfg, metrics, upstream, run_dir / FIG_DIR)
    n_samples = int(cfg.eval.num_samples_in_report)
    s_cols, s_rows = sample_rows(records, n_samples)
    n_q = metrics.get("eval/num_questions")
    p = cfg.ppo
    lines = [
        "# StackLlama evaluation: PPO policy vs SFT reference",
        "",
        f"Model `{cfg.model.name}`, data `{cfg.data.source}`, seed {cfg.seed}; {fmt(n_q)} held-out questions "
        f"(evaluation split), one sampled response per model per question (sampling: ppo.temperature "
        f"{p.temperature}, top_k={p.top_k}, top_p={p.top_p}; {cfg.eval.max_new_tokens} new tokens, same seeds "
        "for both models). Rewards from the reward model"
        + (", gold scores from the synthetic data's hidden scorer." if "eval/gold_mean_ppo" in metrics else "."),
        "",
        "## Figures",
        "",
        md_table(["", "SFT", "PPO"], figures_rows(metrics)),
        "",
        md_table(["comparison", "metric", "value"], comparison_rows(metrics)),
        "",
        *proxy_vs_truth(metrics),
        "## Artifacts",
        "",
        md_table(["stage", "path", "key", "this run", "built", "headline metrics"], upstream_rows(upstream, reused)),
        "",
        "## Training curves and scores",
        "",
    ]
    if not history:
        lines += ["_The PPO artifact has no `history.jsonl`: no training curves._", ""]
    for _, caption, path in images:
        rel = path.relative_to(run_dir).as_posix()
        lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
    lines += [
        f"## Samples ({len(s_rows)} of {len(records)}; all in `eval_samples.jsonl`)",
        "",
        md_table(s_cols, s_rows) if s_rows else "_none_",
        "",
        "## All evaluation metrics",
        "",
        md_table(
            ["metric", "value"],
            [[f"`{k}`", fmt(v, 4)] for k, v in sorted(metrics.items()) if k.startswith("eval/") and k != "eval/report"],
        ),
        "",
    ]
    report = run_dir / "report.md"
    report.write_text(relabel_text("\n".join(lines), cfg))
    try:
        (run_dir / "report.html").write_text(
            relabel_text(
                _html(cfg, metrics, records, s_cols, s_rows, images, run_dir, upstream_rows(upstream, reused)), cfg
            )
        )
    except Exception:
        log.exception("could not write report.html")
    if tracker is not None:
        log_to_tracker(tracker, records, n_samples, images)
    log.info("Wrote %s (%d figures)", report, len(images))
    return report


def _html(
    cfg: Any,
    metrics: Mapping[str, Any],
    records: Sequence[Mapping[str, Any]],
    s_cols: list[str],
    s_rows: list[list[str]],
    images: list[tuple[str, str, Path]],
    run_dir: Path,
    up_rows: list[list[str]],
) -> str:
    """A self-contained-looking HTML twin of report.md (images referenced relatively)."""

    def table(columns: Sequence[str], rows: Sequence[Sequence[str]], raw: bool = False) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            "<tr>" + "".join(f"<td>{c if raw else html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    def untick(rows: Sequence[Sequence[str]]) -> list[list[str]]:
        return [[str(c).strip("`") for c in r] for r in rows]

    samples = []
    for i, r in enumerate(records[: len(s_rows)]):
        cells = [
            str(i + 1),
            html.escape(r["question"]),
            f"<pre>{html.escape(r['sft'])}</pre>",
            f"<pre>{html.escape(r['ppo'])}</pre>",
            f"{fmt(r['reward_sft'])} → {fmt(r['reward_ppo'])}",
        ]
        if "gold_ppo" in r and len(s_cols) > 5:
            cells.append(f"{fmt(r['gold_sft'])} → {fmt(r['gold_ppo'])}")
        samples.append(cells)
    imgs = "".join(
        f'<figure><img src="{html.escape(p.relative_to(run_dir).as_posix())}" alt="{html.escape(c)}">'
        f"<figcaption>{html.escape(c)}</figcaption></figure>"
        for _, c, p in images
    )
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;}table{border-collapse:collapse;"
        "margin:1em 0;}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:13px;}"
        "pre{white-space:pre-wrap;margin:0;font-size:12px;}img{max-width:100%;}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>StackLlama eval</title><style>{style}</style>"
        f"</head><body><h1>StackLlama evaluation: PPO policy vs SFT reference</h1>"
        f"<p>Model {html.escape(str(cfg.model.name))}, data {html.escape(str(cfg.data.source))}, "
        f"seed {html.escape(str(cfg.seed))}.</p>"
        f"<h2>Figures</h2>{table(['', 'SFT', 'PPO'], figures_rows(metrics))}"
        f"{table(['comparison', 'metric', 'value'], untick(comparison_rows(metrics)))}"
        f"<h2>Artifacts</h2>{table(['stage', 'path', 'key', 'this run', 'built', 'headline metrics'], untick(up_rows))}"
        f"<h2>Training curves and scores</h2>{imgs}"
        f"<h2>Samples</h2>{table(s_cols, samples, raw=True)}</body></html>"
    )


__all__ = ["write_report", "load_history", "plot_reward", "plot_kl", "plot_eval_scores", "smooth"]
