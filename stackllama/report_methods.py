"""The methods comparison of a sweep (``sweep=methods``): one table row per method and the
over-optimization figure, read by ``python -m stackllama.report``.

A job's method is its ``method=`` override (``ppo|rloo|grpo|dpo``), else the policy stage it
judged. Per method, over its jobs (seeds): the RM-judged and gold win rates of its policy over
SFT (mean ± std over seeds; one seed: ± the binomial standard error), the KL to SFT the eval
stage measured, and from the policy artifact's manifest its build time, peak RSS and throughput.
Best-of-n rows come from the jobs that measured it (``eval.best_of_n``; its KL is the analytic
log n - (n-1)/n).

``methods_kl.png`` is Gao et al. (2022)'s Figure 1 for this data: the RM score (proxy) and the
gold score against sqrt(KL to SFT), one line per RL job from its ``heldout.jsonl`` (the curve
along training, ``ppo.eval_every``), best-of-n over n, DPO as its end point.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

POLICY_FILE_CURVE = "heldout.jsonl"
OVR = "override:"


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def method_of(row: dict[str, Any]) -> str | None:
    """``method=`` of the job, else ``dpo``/``ppo`` from the policy it judged; None: no policy judged."""
    if row.get(f"{OVR}method"):
        return str(row[f"{OVR}method"])
    for policy in ("dpo", "ppo"):
        if f"upstream/{policy}/path" in row and "eval/win_rate_vs_sft" in row:
            return policy
    return None


def policy_stage(row: dict[str, Any]) -> str:
    return "dpo" if "upstream/dpo/path" in row else "ppo"


def manifest(row: dict[str, Any]) -> dict[str, Any]:
    folder = row.get(f"upstream/{policy_stage(row)}/path")
    path = Path(str(folder)) / "manifest.json" if folder else None
    return json.loads(path.read_text()) if path is not None and path.exists() else {}


def curve(row: dict[str, Any]) -> list[dict[str, float]]:
    """The policy's held-out curve along training (empty without one)."""
    folder = row.get("upstream/ppo/path")
    path = Path(str(folder)) / POLICY_FILE_CURVE if folder else None
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _vals(dicts: list[dict[str, Any]], key: str) -> list[float]:
    """The finite numbers under ``key`` in ``dicts``."""
    return [v for d in dicts if (v := _num(d.get(key))) is not None]


def train_seconds(row: dict[str, Any]) -> float | None:
    """The training loop's own time: the sum of the PPO steps' (history.jsonl; no loading, merging
    or held-out curve), or DPO's trainer time (train/seconds)."""
    if policy_stage(row) == "dpo":
        return _num(manifest(row).get("metrics", {}).get("train/seconds"))
    folder = row.get("upstream/ppo/path")
    path = Path(str(folder)) / "history.jsonl" if folder else None
    if path is None or not path.exists():
        return None
    steps = [json.loads(line).get("time/ppo/step", 0.0) for line in path.read_text().splitlines() if line.strip()]
    return float(sum(steps))


def _mean_pm(values: list[float], binomial_n: float | None = None) -> str:
    """mean ± std over seeds; a single value ± its binomial standard error over ``binomial_n`` questions."""
    if not values:
        return ""
    mu = sum(values) / len(values)
    if len(values) > 1:
        sd = math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
    elif binomial_n:
        sd = math.sqrt(mu * (1 - mu) / binomial_n)
    else:
        return f"{mu:.3g}"
    return f"{mu:.3f} ± {sd:.3f}"


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.4g}" if values else ""


def method_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One row per method (and best-of-n size), aggregated over the method's completed jobs."""
    done = [r for r in rows if r.get("run/status") == "completed" and method_of(r)]
    order = ["ppo", "rloo", "grpo", "dpo"]
    methods = sorted({method_of(r) for r in done}, key=lambda m: (order.index(m) if m in order else 99, m))
    out = []
    for m in methods:
        jobs = [r for r in done if method_of(r) == m]
        mans = [manifest(r) for r in jobs]
        mets = [x.get("metrics", {}) for x in mans]
        n_q = _num(jobs[0].get("eval/num_questions"))
        throughput = [
            _num(x.get("time/ppo/episodes_per_second")) or _num(x.get("train/pairs_per_second")) for x in mets
        ]
        out.append(
            {
                "method": m,
                "seeds": str(len(jobs)),
                "win vs SFT (RM)": _mean_pm(_vals(jobs, "eval/win_rate_vs_sft"), n_q),
                "win vs SFT (gold)": _mean_pm(_vals(jobs, "eval/gold_win_rate_vs_sft"), n_q),
                "KL to SFT (nats)": _mean(_vals(jobs, "eval/kl_mean")),
                "train s": _mean([v for r in jobs if (v := train_seconds(r)) is not None]),
                "build s": _mean(_vals(mans, "build_seconds")),
                "peak RSS MB": _mean(_vals([x.get("memory", {}) for x in mans], "memory/peak_rss_mb")),
                "episodes (pairs) / s": _mean([v for v in throughput if v is not None]),
            }
        )
    bon = [r for r in done if any(k.startswith("eval/bon/") for k in r)]
    sizes = sorted({int(k.split("/")[2]) for r in bon for k in r if k.startswith("eval/bon/")})
    for n in sizes:
        key = f"eval/bon/{n}/"
        jobs = [r for r in bon if f"{key}reward_mean" in r]
        n_q = _num(jobs[0].get("eval/num_questions")) if jobs else None
        out.append(
            {
                "method": f"best-of-{n}",
                "seeds": str(len(jobs)),
                "win vs SFT (RM)": _mean_pm(_vals(jobs, f"{key}win_rate_vs_sft"), n_q),
                "win vs SFT (gold)": _mean_pm(_vals(jobs, f"{key}gold_win_rate_vs_sft"), n_q),
                "KL to SFT (nats)": f"{math.log(n) - (n - 1) / n:.3g} (analytic)",
                "train s": "0",
                "build s": "sampling " + _mean(_vals(jobs, "time/eval/best_of_n_s")),
                "peak RSS MB": "",
                "episodes (pairs) / s": "",
            }
        )
    return out


def methods_table(rows: list[dict[str, Any]]) -> str:
    """The method table as Markdown ("" when no job judged a method)."""
    table = method_rows(rows)
    if not table:
        return ""
    head = list(table[0])
    lines = [
        "## Methods on one SFT model and one reward model per seed",
        "",
        "Win rates of each method's policy over an SFT sample on the held-out questions (ties ½), mean ± std over "
        "seeds (one seed: ± binomial standard error); KL to SFT as the eval stage measures it (sampled, "
        "ppo.kl_estimator). train s: the training loop alone (PPO steps, DPO's trainer); build s: the whole "
        "artifact build (loading, the held-out curve, merging, saving; best-of-n: its sampling and scoring); "
        "peak RSS and throughput from the policy artifact's build.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(r[h] for h in head) + " |" for r in table]
    return "\n".join(lines) + "\n"


def plot_methods_kl(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Proxy (RM) and gold score against sqrt(KL to SFT): RL curves, best-of-n, DPO's end point."""
    done = [r for r in rows if r.get("run/status") == "completed" and method_of(r)]
    curves = [(method_of(r), r, curve(r)) for r in done]
    curves = [c for c in curves if c[2]]
    bon = [r for r in done if any(k.startswith("eval/bon/") for k in r)]
    dpo = [r for r in done if policy_stage(r) == "dpo"]
    if not (curves or bon or dpo):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gold_known = any("gold_mean" in c[2][0] for c in curves) or any("eval/gold_mean_dpo" in r for r in dpo)
    panels = [("reward", "reward-model score (proxy)")] + (
        [("gold", "gold score (true quality)")] if gold_known else []
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    colors = {m: plt.get_cmap("tab10")(i) for i, m in enumerate(["ppo", "rloo", "grpo", "dpo", "bon"])}
    for ax, (what, label) in zip(axes[0], panels):
        seen: set[str] = set()
        for method, _, pts in curves:
            key = "reward_mean" if what == "reward" else "gold_mean"
            xs = [math.sqrt(max(p["kl_mean"], 0.0)) for p in pts if key in p]
            ys = [p[key] for p in pts if key in p]
            color = colors.get(method, "black")
            ax.plot(xs, ys, marker="o", markersize=3, color=color, alpha=0.8, label=None if method in seen else method)
            seen.add(method)
        for r in bon:
            ns = sorted({int(k.split("/")[2]) for k in r if k.startswith("eval/bon/")})
            key = "reward_mean" if what == "reward" else "gold_mean"
            pts = [
                (math.sqrt(r[f"eval/bon/{n}/kl"]), r[f"eval/bon/{n}/{key}"]) for n in ns if f"eval/bon/{n}/{key}" in r
            ]
            if pts:
                ax.plot(
                    *zip(*pts),
                    marker="s",
                    markersize=3,
                    linestyle="--",
                    color=colors["bon"],
                    label=None if "bon" in seen else "best-of-n (n = 1..16)",
                )
                seen.add("bon")
        for r in dpo:
            y = _num(r.get("eval/reward_mean_dpo" if what == "reward" else "eval/gold_mean_dpo"))
            kl = _num(r.get("eval/kl_mean"))
            if y is not None and kl is not None:
                ax.scatter(
                    [math.sqrt(max(kl, 0.0))],
                    [y],
                    marker="*",
                    s=120,
                    color=colors["dpo"],
                    zorder=3,
                    label=None if "dpo" in seen else "DPO (end)",
                )
                seen.add("dpo")
        ax.set_xlabel("sqrt(KL to SFT) (sqrt nats)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Proxy and gold score against KL: RL along training, best-of-n, DPO (Gao et al. 2022, Fig. 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["method_of", "method_rows", "methods_table", "plot_methods_kl", "curve"]
