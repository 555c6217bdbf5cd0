"""stage=eval (PPO vs SFT on held-out questions), its report, and stage=all end to end.

Everything runs the tiny random Llama (``model=tiny``) on a small synthetic corpus.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stackllama.metrics import Metrics
from stackllama.models.loader import model_folder
from stackllama.stages import eval as ev
from stackllama.task import RunContext
from stackllama.tracking import Tracker
from tests.conftest import REPO, compose_cfg, tiny_reward_folder

EVAL_KEYS = (
    "eval/win_rate_vs_sft",
    "eval/reward_mean_ppo",
    "eval/reward_mean_sft",
    "eval/kl_mean",
    "eval/response_len_ppo",
    "eval/response_len_sft",
)
GOLD_KEYS = ("eval/gold_win_rate_vs_sft", "eval/gold_mean_ppo", "eval/gold_mean_sft")
# The recipe at toy scale: each stage takes seconds on the tiny model.
TINY = [
    "model=tiny",
    "logger=none",
    "data.synthetic.num_questions=60",
    "sft.max_steps=4",
    "sft.seq_length=64",
    "sft.eval_size=8",
    "sft.num_sample_generations=1",
    "sft.sample_max_new_tokens=8",
    "rm.max_length=128",
    "rm.max_steps=4",
    "rm.max_eval_pairs=8",
    "ppo.total_episodes=8",
    "ppo.batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.min_new_tokens=4",
    "ppo.max_new_tokens=9",
    "eval.num_questions=4",
    "eval.max_new_tokens=8",
    "eval.batch_size=3",
    "eval.num_samples_in_report=2",
    "dpo.max_steps=3",
    "dpo.batch_size=2",
    "dpo.gradient_accumulation_steps=1",
    "dpo.max_length=128",
    "dpo.warmup_steps=0",
    "dpo.max_eval_pairs=8",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core box threads wait on each other:
    one thread makes these tests several times faster there (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RecordingTracker(Tracker):
    def __init__(self):
        self.tables, self.images, self.logged = [], [], []

    def log(self, values, step=None):
        self.logged.append(dict(values))

    def log_table(self, name, columns, rows, step=None):
        self.tables.append((name, list(columns), [list(r) for r in rows]))

    def log_image(self, name, path):
        assert Path(path).exists()
        self.images.append((name, Path(path)))


def _ctx(run_dir: Path, tracker: Tracker | None = None) -> RunContext:
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir, Metrics(run_dir / "metrics.json"), tracker or Tracker(), torch.device("cpu"))


# Pure figures ---------------------------------------------------------------------------


def test_win_rate_counts_ties_half():
    assert ev.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(0.625)
    assert math.isnan(ev.win_rate([], []))


def test_eval_questions_are_unique_and_in_order():
    assert ev.eval_questions(["b", "a", "b", "c", "a", "d"], 3) == ["b", "a", "c"]
    assert ev.eval_questions(["x", "x"], 5) == ["x"]


def test_summarize_reports_every_figure():
    m = ev.summarize(
        [[1, 2, 3], [4, 4, 4, 4, 4]],
        ["abc", "```a``` ```b```"],
        [[1, 2], [5]],
        ["ab", "c"],
        reward_ppo=[1.0, 0.0],
        reward_sft=[0.0, 0.0],
        kl=[2.0, 4.0],
        gold_ppo=[0.5, -1.0],
        gold_sft=[0.0, 0.0],
    )
    assert m["eval/win_rate_vs_sft"] == 0.75 and m["eval/tie_rate"] == 0.5
    assert m["eval/kl_mean"] == 3.0 and m["eval/kl_per_token"] == pytest.approx(6 / 8)
    assert m["eval/response_len_ppo"] == 4.0 and m["eval/response_len_sft"] == 1.5
    assert m["eval/hack/frac_repeat_dominated_ppo"] == 0.5 and m["eval/hack/frac_fence_spam_ppo"] == 0.5
    assert m["eval/hack/frac_hacking_sft"] == 0.0
    assert m["eval/gold_win_rate_vs_sft"] == 0.5 and m["eval/proxy_gold_win_gap"] == 0.25
    assert m["eval/gold_mean_ppo"] == -0.25 and m["eval/gold_mean_sft"] == 0.0
    no_gold = ev.summarize([[1]], ["a"], [[1]], ["a"], [0.0], [0.0], [0.0])
    assert not any(k in no_gold for k in GOLD_KEYS)


# Generation, KL and scoring on real (tiny) models ------------------------------------------


def test_identical_models_tie_with_zero_kl(tmp_path):
    """Policy == reference: the same seeds give the same responses, so KL 0 and a 0.5 win rate."""
    from stackllama.data import build_dataset, gold_scorer

    cfg = compose_cfg(TINY + [f"artifacts_dir={tmp_path}", "eval.num_questions=4", "eval.batch_size=3"])
    base = model_folder(cfg.model)
    questions = list(build_dataset(cfg.data).evaluation["question"])
    metrics, records = ev.compare(
        cfg, _ctx(tmp_path / "run"), base, base, tiny_reward_folder(), questions, gold_scorer(cfg.data)
    )
    for key in EVAL_KEYS + GOLD_KEYS:
        assert key in metrics and math.isfinite(metrics[key]), key
    n = metrics["eval/num_questions"]
    assert n == len(records) == min(4, len(set(questions)))  # two batches (3 + 1)
    assert len({r["question"] for r in records}) == n
    assert metrics["eval/frac_identical_responses"] == 1.0
    assert all(r["sft"] == r["ppo"] for r in records)
    assert abs(metrics["eval/kl_mean"]) < 1e-4
    assert metrics["eval/win_rate_vs_sft"] == 0.5 and metrics["eval/gold_win_rate_vs_sft"] == 0.5
    assert metrics["eval/response_len_ppo"] == metrics["eval/response_len_sft"] == 8  # EOS off, as in PPO


def test_sampling_is_reseeded_per_batch(tmp_path):
    """Same seed: the same responses whatever ran before; another seed: others (sampled, not greedy)."""
    cfg = compose_cfg(TINY + [f"artifacts_dir={tmp_path}"])
    model, tok = ev.load_lm(model_folder(cfg.model), cfg, torch.device("cpu"))
    qs = ["How do I brew?", "Why is my beer cloudy?", "What does a compressor do?"]
    ids = [tok(f"Question: {q}\n\nAnswer: ", add_special_tokens=False)["input_ids"] for q in qs]
    sampling = ev.sampling_settings(cfg)

    def texts(seed):
        batches = ev.sample(model, tok, qs, ids, 6, 2, sampling, seed, torch.device("cpu"))
        return [r for b in batches for r in b.responses]

    first = texts(0)
    torch.rand(1000)  # disturb the global generator
    assert texts(0) == first
    assert texts(1) != first
    assert len(first) == 3


def test_kl_is_positive_for_a_sharper_policy(tmp_path):
    """Scaling the LM head sharpens the policy: its own samples then have higher log-prob than under the base."""
    from transformers import AutoModelForCausalLM

    from stackllama.models.loader import load_tokenizer

    cfg = compose_cfg(TINY + [f"artifacts_dir={tmp_path}", "eval.num_questions=3"])
    base = model_folder(cfg.model)
    sharp = tmp_path / "sharp"
    model = AutoModelForCausalLM.from_pretrained(str(base), tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.get_input_embeddings().weight * 8.0)
    model.save_pretrained(str(sharp))
    load_tokenizer(base).save_pretrained(str(sharp))
    from stackllama.data import build_dataset

    questions = list(build_dataset(cfg.data).evaluation["question"])
    metrics, _ = ev.compare(cfg, _ctx(tmp_path / "run"), sharp, base, tiny_reward_folder(), questions, None)
    assert metrics["eval/frac_identical_responses"] < 1.0
    assert metrics["eval/kl_mean"] > 3.0  # clearly above zero (about 15 nats here), not sampling noise


# The report -------------------------------------------------------------------------------


def _fake_ppo_artifact(folder: Path, steps: int = 25) -> None:
    from stackllama.metrics import write_json_atomic

    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    with open(folder / "history.jsonl", "w") as fh:
        for s in range(1, steps + 1):
            fh.write(
                json.dumps(
                    {
                        "ppo/step": s,
                        "env/reward_mean": 0.1 * s,
                        "env/reward_std": 0.5,
                        "gold/score_mean": 1.0 - 0.02 * s,
                        "objective/kl": 0.3 * s,
                        "objective/kl_coef": 0.2 * (1 + 0.01 * s),
                    }
                )
                + "\n"
            )
    write_json_atomic(
        folder / "manifest.json",
        {
            "stage": "ppo",
            "key": folder.name,
            "created": "now",
            "build_seconds": 1.5,
            "metrics": {"ppo/reward_mean_end": 2.5, "objective/kl_end": 7.5},
        },
    )


def test_report_has_figures_artifacts_samples_and_plots(tmp_path):
    from stackllama.stages.eval_report import write_report

    cfg = compose_cfg(TINY + [f"artifacts_dir={tmp_path}", "eval.num_samples_in_report=2", "ppo.temperature=0.7"])
    ppo = tmp_path / "art" / "ppo" / "tiny-abc123"
    _fake_ppo_artifact(ppo)
    explicit = tmp_path / "given_model"
    explicit.mkdir()
    records = [
        {
            "question": f"Q{i} | with a pipe\nand a line",
            "sft": f"sft answer {i}",
            "ppo": f"```ppo``` {i}",
            "reward_sft": 0.1 * i,
            "reward_ppo": 0.2 * i,
            "gold_sft": 1.0,
            "gold_ppo": 1.5,
            "kl": 0.5,
        }
        for i in range(4)
    ]
    metrics = ev.summarize(
        [[1, 2]] * 4,
        [r["ppo"] for r in records],
        [[3]] * 4,
        [r["sft"] for r in records],
        [r["reward_ppo"] for r in records],
        [r["reward_sft"] for r in records],
        [0.5] * 4,
        [r["gold_ppo"] for r in records],
        [r["gold_sft"] for r in records],
    )
    tracker = RecordingTracker()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    report = write_report(
        cfg,
        run_dir,
        metrics,
        records,
        {"ppo": ppo, "sft": explicit, "rm": explicit},
        {"ppo": False, "sft": True, "rm": True},
        tracker,
    )
    text = report.read_text()
    assert report == run_dir / "report.md" and (run_dir / "report.html").exists()
    for needle in (
        "eval/win_rate_vs_sft",
        "eval/gold_win_rate_vs_sft",
        "eval/kl_mean",
        "tiny-abc123",
        str(ppo),
        "ppo/reward_mean_end 2.500",
        "built now",
        "explicit path",
        "Q1 &#124; with a pipe<br>and a line",
        "temperature 0.7, top_k=0, top_p=1.0",  # the sampling eval used (it once said top_k=0 whatever ran)
    ):
        assert needle in text, needle
    pngs = sorted(p.name for p in (run_dir / "figures").glob("*.png"))
    assert pngs == ["eval_scores.png", "ppo_kl.png", "ppo_reward.png"]
    for name in pngs:
        assert f"](figures/{name})" in text
        assert (run_dir / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sample_lines = [
        line
        for line in text.splitlines()
        if line.startswith("| 1 |") or line.startswith("| 2 |") or line.startswith("| 3 |")
    ]
    assert len(sample_lines) == 2  # eval.num_samples_in_report
    assert [t[0] for t in tracker.tables] == ["eval/samples"] and len(tracker.tables[0][2]) == 2
    assert {n for n, _ in tracker.images} == {"eval/ppo_reward_curve", "eval/ppo_kl_curve", "eval/scores_sft_vs_ppo"}


def test_report_without_history_still_written(tmp_path):
    from stackllama.stages.eval_report import write_report

    cfg = compose_cfg(TINY + [f"artifacts_dir={tmp_path}"])
    ppo = tmp_path / "policy"
    ppo.mkdir()
    report = write_report(
        cfg, tmp_path, {"eval/win_rate_vs_sft": 0.5, "eval/num_questions": 0}, [], {"ppo": ppo, "sft": ppo, "rm": ppo}
    )
    assert "no training curves" in report.read_text()


# Stages --------------------------------------------------------------------------------------


def test_stage_eval_with_given_models(tmp_path):
    """stage=eval builds the PPO artifact it needs (from explicit SFT/RM models), then evaluates."""
    base = model_folder(compose_cfg(["model=tiny"]).model)
    cfg = compose_cfg(
        TINY
        + [
            f"artifacts_dir={tmp_path / 'art'}",
            f"ppo.policy_path={base}",
            f"ppo.reward_model_path={tiny_reward_folder()}",
            "eval.best_of_n=[1,2,4]",
            "ppo.eval_every=1",
        ]
    )
    tracker = RecordingTracker()
    ctx = _ctx(tmp_path / "run", tracker)
    ctx.metrics.update({"run/status": "running"})  # as run_task marks a job until it ends
    objective = ev.run(cfg, ctx)
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert objective == m["eval/win_rate_vs_sft"] and 0.0 <= objective <= 1.0
    for key in EVAL_KEYS + GOLD_KEYS:
        assert key in m, key
    # best-of-n from the SFT model: the RM's pick of more samples scores at least as well, KL analytic
    bon = [m[f"eval/bon/{n}/reward_mean"] for n in (1, 2, 4)]
    assert bon[0] <= bon[1] <= bon[2] and all(f"eval/bon/{n}/gold_mean" in m for n in (1, 2, 4))
    assert m["eval/bon/1/kl"] == 0.0 and m["eval/bon/4/kl"] == pytest.approx(math.log(4) - 0.75)
    assert m["upstream/ppo/reused"] is False and m["upstream/sft/path"] == str(base)
    ppo_dir = Path(m["upstream/ppo/path"])
    assert (ppo_dir / "manifest.json").exists() and (ppo_dir / "history.jsonl").exists()
    curve = [json.loads(line) for line in (ppo_dir / "heldout.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0.0, 1.0, 2.0] and all(r["questions"] == 4 for r in curve)
    assert m["eval/bon/4/win_rate_vs_sft"] >= 0.0 and "eval/bon/4/gold_win_rate_vs_sft" in m
    run_dir = tmp_path / "run"
    assert (run_dir / "report.md").exists() and len(list((run_dir / "figures").glob("*.png"))) == 4
    assert (run_dir / "figures" / "kl_frontier.png").exists()  # the curve and best-of-n against sqrt(KL)
    assert "kl_frontier.png" in (run_dir / "report.md").read_text()
    assert len((run_dir / "eval_samples.jsonl").read_text().splitlines()) == m["eval/num_questions"]
    assert any("eval/win_rate_vs_sft" in v for v in tracker.logged)

    # the next job with this config finds the PPO artifact instead of training again
    from stackllama import artifacts

    assert artifacts.ensure("ppo", cfg, ctx, lambda *a: pytest.fail("PPO built twice"))[2] is True


def _cli(args: list[str], run_dir: Path, timeout: int = 600) -> tuple[dict, str]:
    env = {
        **os.environ,
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }  # see one_torch_thread
    proc = subprocess.run(
        [sys.executable, "-m", "stackllama", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = proc.stdout + proc.stderr + ((run_dir / "train.log").read_text() if (run_dir / "train.log").exists() else "")
    assert proc.returncode == 0, log[-6000:]
    return json.loads((run_dir / "metrics.json").read_text()), log


def _snapshot(folder: Path) -> tuple[float, str, dict]:
    manifest = folder / "manifest.json"
    files = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    return folder.stat().st_mtime_ns, manifest.read_text(), files


@pytest.mark.slow
def test_all_end_to_end_then_ppo_reuses_sft_and_rm(tmp_path):
    art = tmp_path / "artifacts"
    common = TINY + [f"artifacts_dir={art}"]

    # 1. the whole recipe in one command
    m, log = _cli(["stage=all", *common], tmp_path / "run_all")
    run_dir = tmp_path / "run_all"
    assert m["run/status"] == "completed"
    for key in EVAL_KEYS + GOLD_KEYS:
        assert key in m and isinstance(m[key], float), key
    for stage in ("sft", "rm", "ppo"):
        assert m[f"upstream/{stage}/reused"] is False, stage
        assert (Path(m[f"upstream/{stage}/path"]) / "manifest.json").exists()
        assert f"time/stage/{stage}_s" in m
        assert any(k.startswith(f"{stage}/") for k in m), f"no {stage}/ metrics"
    assert "time/stage/eval_s" in m
    assert "rm/eval/accuracy" in m and "ppo/reward_mean_end" in m and "ppo/objective/kl_end" in m
    report = (run_dir / "report.md").read_text()
    assert "eval/win_rate_vs_sft" in report
    pngs = {p.name for p in (run_dir / "figures").glob("*.png")}
    assert {"ppo_reward.png", "ppo_kl.png", "eval_scores.png"} <= pngs
    assert "all: sft artifact" in log and "built in" in log

    sft_dir, rm_dir = Path(m["upstream/sft/path"]), Path(m["upstream/rm/path"])
    before = {d: _snapshot(d) for d in (sft_dir, rm_dir)}

    # 2. a PPO sweep point: new PPO artifact, the SFT and RM artifacts reused untouched
    m2, log2 = _cli(["stage=ppo", *common, "ppo.kl_coef=0.05"], tmp_path / "run_ppo")
    assert m2["run/status"] == "completed"
    assert m2["upstream/sft/reused"] is True and m2["upstream/rm/reused"] is True
    assert m2["upstream/sft/path"] == str(sft_dir) and m2["upstream/rm/path"] == str(rm_dir)
    assert m2["artifact/reused"] is False and m2["artifact/path"] != m["upstream/ppo/path"]
    assert "Reusing sft artifact" in log2 and "Reusing rm artifact" in log2
    assert "Building sft artifact" not in log2 and "Building rm artifact" not in log2
    for d, snap in before.items():
        assert _snapshot(d) == snap, f"{d} changed"

    # 3. the same recipe again: every artifact reused, only the evaluation runs, with the same result
    m3, log3 = _cli(["stage=all", *common], tmp_path / "run_all_again")
    for stage in ("sft", "rm", "ppo"):
        assert m3[f"upstream/{stage}/reused"] is True, stage
        assert f"all: {stage} artifact" in log3 and "reused (built earlier" in log3
    assert "Building" not in log3
    for key in EVAL_KEYS + GOLD_KEYS:
        assert m3[key] == m[key], key  # same artifacts, same seeds: the same figures

    # 4. DPO on the same SFT model: stage=dpo builds its artifact, stage=eval eval.policy=dpo finds
    # it and judges it with the same RM, its figures named for DPO
    m4, _ = _cli(["stage=dpo", *common], tmp_path / "run_dpo")
    assert m4["upstream/sft/reused"] is True and m4["artifact/reused"] is False
    assert m4["data/dpo_train_pairs"] > 0 and math.isfinite(m4["train/loss"])
    m5, log5 = _cli(["stage=eval", "eval.policy=dpo", *common], tmp_path / "run_eval_dpo")
    assert m5["upstream/dpo/reused"] is True and m5["upstream/dpo/path"] == m4["artifact/path"]
    assert m5["upstream/rm/path"] == str(rm_dir) and "upstream/ppo/path" not in m5
    assert "Building" not in log5
    for key in EVAL_KEYS + GOLD_KEYS:
        assert key.replace("_ppo", "_dpo") in m5, key
    assert not [k for k in m5 if k.startswith("eval/") and "ppo" in k]
    assert "DPO policy vs SFT reference" in (tmp_path / "run_eval_dpo" / "report.md").read_text()


def test_eval_samples_and_measures_kl_as_ppo_is_configured():
    """Eval judges the policy on PPO's own sampling settings and reports the KL with PPO's
    estimator (it once hard-coded both: ancestral sampling and k1)."""
    from stackllama.ppo.core import kl_estimate

    cfg = compose_cfg(["ppo.temperature=0.5", "ppo.top_k=5", "ppo.top_p=0.9", "ppo.stop_at_eos=true"])
    s = ev.sampling_settings(cfg)
    assert (s.temperature, s.top_k, s.top_p, s.stop_at_eos) == (0.5, 5, 0.9, True)
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]])
    bt = SimpleNamespace(response_mask=torch.tensor([[1, 1, 0]]))
    k1 = ev.sequence_kl([lp], [ref], [bt], "k1")[0]
    k3 = ev.sequence_kl([lp], [ref], [bt], "k3")[0]
    assert k1 == pytest.approx(0.5 - 1.0)  # sum of log p - log p_ref over the unmasked tokens
    r = ref[0, :2] - lp[0, :2]
    assert k3 == pytest.approx(float((r.exp() - 1 - r).sum())) and k3 != pytest.approx(k1)
    assert k3 == pytest.approx(float(kl_estimate(lp, ref, "k3")[0, :2].sum()))
