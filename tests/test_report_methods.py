"""The methods comparison in ``python -m stackllama.report``: the table and the sqrt(KL) figure."""

from __future__ import annotations

import json
import math
from pathlib import Path

from stackllama import report_methods as rm


def _job(tmp: Path, name: str, method: str, seed: int, win: float, gold: float, kl: float, **extra) -> dict:
    policy = "dpo" if method == "dpo" else "ppo"
    art = tmp / f"{name}_art"
    art.mkdir()
    (art / "manifest.json").write_text(
        json.dumps(
            {
                "build_seconds": 100.0 + seed,
                "memory": {"memory/peak_rss_mb": 2000.0},
                "metrics": {"train/pairs_per_second": 1.0, "train/seconds": 7.0},
            }
        )
    )
    if policy == "ppo":
        rows = [{"step": s, "reward_mean": -2 + s, "gold_mean": 0.2 + 0.1 * s, "kl_mean": 0.5 * s} for s in range(3)]
        (art / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (art / "history.jsonl").write_text("".join(json.dumps({"time/ppo/step": 1.5}) + "\n" for _ in range(2)))
    return {
        "job": name,
        "run/status": "completed",
        "override:method": method,
        "override:seed": str(seed),
        f"upstream/{policy}/path": str(art),
        "eval/win_rate_vs_sft": win,
        "eval/gold_win_rate_vs_sft": gold,
        "eval/kl_mean": kl,
        "eval/num_questions": 48,
        f"eval/reward_mean_{policy}": 0.1,
        f"eval/gold_mean_{policy}": 0.5,
        **extra,
    }


def test_method_rows_aggregate_seeds_and_list_best_of_n(tmp_path):
    bon = {
        "eval/bon/1/reward_mean": -2.0,
        "eval/bon/1/gold_mean": 0.3,
        "eval/bon/1/kl": 0.0,
        "eval/bon/4/reward_mean": 0.5,
        "eval/bon/4/gold_mean": 0.8,
        "eval/bon/4/kl": math.log(4) - 0.75,
        "eval/bon/4/win_rate_vs_sft": 0.8,
        "eval/bon/4/gold_win_rate_vs_sft": 0.7,
        "time/eval/best_of_n_s": 130.0,
    }
    rows = [
        _job(tmp_path, "0", "ppo", 0, 0.6, 0.7, 3.0, **bon),
        _job(tmp_path, "1", "ppo", 1, 0.8, 0.5, 4.0),
        _job(tmp_path, "2", "dpo", 0, 0.55, 0.6, 0.5),
        {"job": "3", "run/status": "failed", "override:method": "rloo"},
    ]
    table = {r["method"]: r for r in rm.method_rows(rows)}
    assert set(table) == {"ppo", "dpo", "best-of-1", "best-of-4"}  # the failed rloo job is left out
    assert table["ppo"]["seeds"] == "2" and table["ppo"]["win vs SFT (RM)"] == "0.700 ± 0.141"  # std over seeds
    assert table["dpo"]["win vs SFT (RM)"] == f"0.550 ± {math.sqrt(0.55 * 0.45 / 48):.3f}"  # one seed: binomial
    assert table["ppo"]["KL to SFT (nats)"] == "3.5" and table["ppo"]["build s"] == "100.5"
    assert table["ppo"]["train s"] == "3" and table["dpo"]["train s"] == "7"  # the loop alone
    assert table["ppo"]["peak RSS MB"] == "2000"
    assert (
        table["best-of-4"]["win vs SFT (gold)"].startswith("0.700")
        and "analytic" in table["best-of-4"]["KL to SFT (nats)"]
    )
    text = rm.methods_table(rows)
    assert "| ppo | 2 |" in text and "best-of-4" in text
    png = rm.plot_methods_kl(rows, tmp_path / "methods_kl.png")
    assert png is not None and png.stat().st_size > 0
