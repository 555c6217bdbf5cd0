"""Every stage runs end to end on small real dumps with the embedded default's data settings (issue 15).

Dumps of a few hundred questions are common (small sites, one tag, a first try). The audio
dump gives the finetune split only 16 questions, which the old fixed ``sft.eval_size=48``
held out entirely ("holds out every finetune question (16); lower it"). Here ``stage=all``
(SFT -> RM -> PPO -> eval) runs through ``run_task`` on the audio and beer dumps with the
embedded settings; only the model (``model=tiny``) and the step counts are shrunk, so the
data path (splits, hold-out, pair filtering, prompts, eval questions) is the default's.
"""

from __future__ import annotations

import json
import math
import re

import pytest

from stackllama import task
from tests.conftest import compose_cfg

SITES = ["audio.stackexchange.com", "beer.stackexchange.com"]
SHORT = [
    "model=tiny",
    "logger=none",
    "sft.max_steps=2",
    "rm.max_steps=2",
    "ppo.total_episodes=32",  # one step of the embedded default's 32
    "eval.max_new_tokens=8",
    "sft.num_sample_generations=1",
    "sft.sample_max_new_tokens=8",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("site", SITES, ids=["audio", "beer"])
def test_stage_all_runs_on_a_small_dump_with_the_embedded_settings(site, shared_data, tmp_path, monkeypatch, caplog):
    cfg = compose_cfg(
        [
            *SHORT,
            "stage=all",
            "data=stackexchange_dump",
            f"data.path={shared_data / site}",
            f"artifacts_dir={tmp_path / 'art'}",
        ]
    )
    cap, fraction = int(cfg.sft.eval_size), float(cfg.sft.eval_fraction)  # the embedded default's hold-out
    monkeypatch.setattr(task, "_hydra_info", lambda cfg=None: task.JobInfo(tmp_path / "run", False, None, "t", [], []))
    with caplog.at_level("INFO", logger="stackllama"):
        objective = task.run_task(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run/status"] == "completed" and 0.0 <= objective <= 1.0
    said = re.search(r"SFT held out (\d+) of (\d+) finetune questions \((\d+) texts\)", caplog.text)
    assert said, "the log does not say what was held out"
    held, questions, texts = map(int, said.groups())
    assert held == metrics["sft/data/sft_eval_questions"] and texts == metrics["sft/data/sft_eval_texts"]
    assert held <= max(1, math.ceil(fraction * questions)) and held < questions  # a fraction, some left to train on
    assert metrics["sft/data/sft_train_texts"] > 0 and 0 < texts <= cap
    for key in ("sft/eval/perplexity", "rm/eval/accuracy", "ppo/objective", "eval/win_rate_vs_sft"):
        assert math.isfinite(float(metrics[key])), key
