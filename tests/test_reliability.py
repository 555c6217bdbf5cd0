"""Faults during a run (issue 15): diverging PPO, interrupted runs, resume, model and data checks.

* a PPO run that goes NaN skips and counts the bad updates, ends with an error when they repeat,
  and publishes nothing; the artifact store refuses any folder with non-finite weights;
* SIGTERM / Ctrl-C leave ``run/status: interrupted`` with the signal and the conventional exit code;
* an SFT build resumed from its last checkpoint equals the uninterrupted build;
* the packaged GGUF stands in for its own model only; a causal LM is not a reward model;
* small data sets hold out a fraction of the finetune questions, never all of them.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackllama import artifacts, pipeline, task
from stackllama.metrics import Metrics
from stackllama.models.loader import model_folder
from stackllama.task import RunContext
from stackllama.tracking import Tracker
from tests.conftest import REPO, compose_cfg, tiny_reward_folder

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _ctx(run_dir: Path) -> RunContext:
    return RunContext(run_dir, Metrics(run_dir / "metrics.json"), Tracker(), CPU)


def _tiny(*overrides: str):
    return compose_cfg(["model=tiny", "logger=none", "data.synthetic.num_questions=60", *overrides])


# --------------------------------------------------------------------------- non-finite guards (row 1)


PPO_QUICK = [
    "ppo.batch_size=4",
    "ppo.mini_batch_size=2",
    "ppo.min_new_tokens=4",
    "ppo.max_new_tokens=9",
    "ppo.sample_every=0",
    "ppo.save_every=0",
]


def _all_finite(folder: Path) -> bool:
    from safetensors.torch import load_file

    tensors = [t for f in folder.glob("*.safetensors") for t in load_file(str(f)).values()]
    tensors += [t for f in folder.glob("*.pt") for t in torch.load(f, weights_only=True).values()]
    return bool(tensors) and all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize(
    "overrides,outcome",
    [
        (["ppo.total_episodes=4"], "finite"),
        (["ppo.total_episodes=4", "++ppo.max_nonfinite_skips=1"], "nothing"),
        (["ppo.total_episodes=16"], "nothing"),
    ],
    ids=["issue_command", "stop_at_first", "repeated"],
)
def test_nan_producing_ppo_run_never_publishes_non_finite_weights(tmp_path, overrides, outcome):
    """The issue's ``ppo.learning_rate=1e4`` for one step: an update's gradient norm goes inf and
    clipping by it made every trained weight NaN; the run completed and published them. Now that
    update is skipped and counted, so the published weights are finite; with the guard at one
    skip (``ppo.max_nonfinite_skips=1``), or with more steps where the skips repeat, the build ends
    with an error and publishes nothing."""
    from stackllama import pipeline

    cfg = _tiny(
        f"artifacts_dir={tmp_path / 'art'}",
        f"ppo.policy_path={model_folder(_tiny().model)}",
        f"ppo.reward_model_path={tiny_reward_folder()}",
        "ppo.learning_rate=1e4",
        *PPO_QUICK,
        *overrides,
    )
    ctx = _ctx(tmp_path / "run")
    build = pipeline.builder("ppo", pipeline.resolve("ppo", cfg, ctx))
    if outcome == "nothing":
        with pytest.raises(FloatingPointError, match=r"PPO diverged .*NaN/inf loss or gradient .*nothing is published"):
            artifacts.ensure("ppo", cfg, ctx, build)
        assert not list((tmp_path / "art" / "ppo").glob("*/manifest.json")), "a diverged PPO run was published"
        return
    folder, manifest, _ = artifacts.ensure("ppo", cfg, ctx, build)
    assert _all_finite(folder), "the published PPO policy or value head holds NaN/inf"
    assert manifest["metrics"]["ppo/skipped_nonfinite"] >= 1  # counted, in the artifact's metrics too


def test_store_refuses_to_publish_non_finite_weights(tmp_path):
    from safetensors.torch import save_file

    def nan_build(cfg, ctx, work_dir, out_dir):
        save_file(
            {"lm.weight": torch.ones(4, 4), "score.weight": torch.tensor([[1.0, float("nan")]])},
            str(Path(out_dir) / "model.safetensors"),
        )
        torch.save({"summary.weight": torch.ones(3)}, Path(out_dir) / "value_head.pt")
        return {"train/loss": 1.0}

    cfg = _tiny(f"artifacts_dir={tmp_path}")
    with pytest.raises(artifacts.NonFiniteWeights, match=r"model.safetensors tensor 'score.weight' holds 1 NaN/inf"):
        artifacts.ensure("sft", cfg, _ctx(tmp_path / "run"), nan_build)
    assert not artifacts.is_trusted(artifacts.stage_dir("sft", cfg))

    def inf_head_build(cfg, ctx, work_dir, out_dir):
        torch.save({"summary.weight": torch.tensor([1.0, float("inf")])}, Path(out_dir) / "value_head.pt")
        return {}

    with pytest.raises(artifacts.NonFiniteWeights, match="value_head.pt tensor 'summary.weight'"):
        artifacts.ensure("sft", cfg, _ctx(tmp_path / "run"), inf_head_build)
    assert not artifacts.is_trusted(artifacts.stage_dir("sft", cfg))


def _ppo_trainer(tmp_path: Path, scorer, *overrides: str):
    from stackllama.data.prompts import PromptSource
    from stackllama.ppo.trainer import PPOTrainer
    from stackllama.stages.ppo import load_policy

    cfg = _tiny(*PPO_QUICK, *overrides)
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    questions = [f"How do I keep batch {i} from going sour?" for i in range(8)]
    prompts = PromptSource(questions, [f"Question: {q}\n\nAnswer: " for q in questions], tok, 64, 0)
    return PPOTrainer(cfg.ppo, policy, tok, scorer, prompts, CPU, 0, tmp_path / "ckpt")


def test_non_finite_losses_are_skipped_counted_and_end_the_run(tmp_path):
    """A reward model answering NaN makes every loss NaN: no update lands (weights unchanged and
    finite), each is counted, and ppo.max_nonfinite_skips of them in a row end the run."""

    def nan_scores(questions, answers):
        return torch.full((len(answers),), float("nan"))

    trainer = _ppo_trainer(
        tmp_path, nan_scores, "ppo.total_episodes=4", "ppo.ppo_epochs=1", "ppo.max_nonfinite_skips=5"
    )
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    stats = trainer.train()[0]
    assert stats["ppo/skipped_nonfinite"] == 2  # batch 4 in mini-batches of 2: two updates, both NaN
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))
    assert trainer.state()["skipped_nonfinite"] == 2  # kept in checkpoints

    again = _ppo_trainer(tmp_path / "b", nan_scores, "ppo.total_episodes=12", "ppo.max_nonfinite_skips=3")
    with pytest.raises(FloatingPointError, match="3 updates in a row had a NaN/inf loss"):
        again.train()


def test_a_nan_ratio_is_skipped_like_one_above_the_threshold(tmp_path, monkeypatch):
    """``ratio_mean > ratio_threshold`` is False for NaN, so the guard never fired for it."""
    from stackllama.ppo import core
    from stackllama.ppo import trainer as trainer_module

    real = core.policy_loss

    def nan_ratio(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        return loss, {**stats, "ratio_mean": torch.tensor(float("nan"))}

    monkeypatch.setattr(trainer_module.core, "policy_loss", nan_ratio)
    trainer = _ppo_trainer(
        tmp_path,
        lambda q, a: torch.zeros(len(a)),
        "ppo.total_episodes=4",
        "ppo.ppo_epochs=1",
        "ppo.max_nonfinite_skips=10",
    )
    before = [p.detach().clone() for p in trainer.policy.trainable_parameters()]
    stats = trainer.train()[0]
    assert stats["ppo/skipped_batches"] == 2 and stats["ppo/skipped_nonfinite"] == 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.policy.trainable_parameters()))


# --------------------------------------------------------------------------- interrupted runs (row 6)


def _sft_cli(tmp_path: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stackllama",
        "stage=sft",
        "model=tiny",
        "logger=none",
        "data.synthetic.num_questions=60",
        "sft.seq_length=64",
        "sft.eval_size=8",
        "sft.warmup_steps=0",
        "sft.num_sample_generations=0",
        f"artifacts_dir={tmp_path / 'art'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *overrides,
    ]


def test_sigterm_during_sft_leaves_run_status_interrupted(tmp_path):
    """SIGTERM (Slurm preemption, a time limit) mid-training: metrics.json says interrupted with the
    signal, the process exits 143 (128 + SIGTERM), the checkpoints stay and nothing is published."""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        _sft_cli(tmp_path, "sft.max_steps=10000", "sft.save_steps=1", "sft.logging_steps=1"),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((tmp_path / "art").glob("sft/*.work/checkpoints/checkpoint-*/trainer_state.json")):
                break  # training is under way
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["run/status"] == "interrupted" and metrics["run/signal"] == "SIGTERM"
    assert "re-run the same command to resume" in metrics["run/error"]
    assert not list((tmp_path / "art").glob("sft/*/manifest.json"))
    assert list((tmp_path / "art").glob("sft/*.work/checkpoints/checkpoint-*"))


class _ClosingTracker(Tracker):
    def __init__(self):
        self.exit_codes: list[int] = []

    def finish(self, exit_code: int = 0) -> None:
        self.exit_codes.append(exit_code)


@pytest.fixture
def python_sigint_handler():
    """Python's own Ctrl-C handler for the test: a shell's background job (``nohup``, ``cmd &``)
    starts with SIGINT ignored, and then no KeyboardInterrupt would ever come."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_interrupt_closes_the_tracker_with_the_signal_exit_code(tmp_path, monkeypatch, signum, python_sigint_handler):
    """In-process, through run_task: the tracker (the W&B run) is finished with 128 + signum."""
    tracker = _ClosingTracker()
    monkeypatch.setattr(task, "make_tracker", lambda *a, **k: tracker)
    monkeypatch.setattr(task, "_hydra_info", lambda cfg=None: task.JobInfo(tmp_path, False, None, "t", [], []))

    def interrupted_stage(cfg, ctx):
        os.kill(os.getpid(), signum)  # delivered to this (main) thread before the next bytecode
        time.sleep(5)
        raise AssertionError("the signal did not interrupt the stage")

    monkeypatch.setattr("stackllama.stages.get_runner", lambda name: interrupted_stage)
    expected = KeyboardInterrupt if signum == signal.SIGINT else SystemExit
    with pytest.raises(expected) as info:
        task.run_task(_tiny(f"artifacts_dir={tmp_path / 'art'}"))
    if expected is SystemExit:
        assert info.value.code == 143
    assert tracker.exit_codes == [128 + signum]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["run/status"] == "interrupted" and metrics["run/signal"] == signal.Signals(signum).name
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_sweep_report_shows_an_interrupted_job(tmp_path):
    from stackllama import report

    sweep = tmp_path / "sweep"
    for num, status in enumerate(("completed", "interrupted")):
        job = sweep / f"{num}_ppo.kl_coef=0.{num + 1}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra" / "overrides.yaml").write_text(f"- ppo.kl_coef=0.{num + 1}\n")
        m = {"run/status": status, "run/objective": 1.0}
        if status == "interrupted":
            m.update({"run/signal": "SIGTERM", "run/error": "SIGTERM (re-run the same command to resume)"})
        (job / "metrics.json").write_text(json.dumps(m))
    text = report.write_summary(sweep)["markdown"].read_text()
    assert "2 jobs: 1 completed, 1 interrupted" in text
    assert "| 1 | 0.2 | interrupted |" in text
    assert "- job 1: interrupted SIGTERM (re-run the same command to resume)" in text


# --------------------------------------------------------------------------- SFT resume (row 8)


SFT_QUICK = [
    "sft.seq_length=64",
    "sft.batch_size=4",
    "sft.eval_size=8",
    "sft.learning_rate=1e-2",
    "sft.warmup_steps=0",
    "sft.logging_steps=1",
    "sft.num_sample_generations=0",
    "sft.max_steps=2",
    "sft.save_steps=2",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def test_sft_resumed_from_its_last_checkpoint_equals_an_uninterrupted_build(tmp_path, monkeypatch):
    """A crash after the last checkpoint (here: in the merge), then the same build again: it must
    not train a step more (it did: train/steps=3 for sft.max_steps=2), and its weights and
    train/steps equal those of a build that was never interrupted."""
    from stackllama.stages import sft

    straight_cfg = _tiny(f"artifacts_dir={tmp_path / 'a'}", *SFT_QUICK)
    straight, m_straight = pipeline.run_stage("sft", straight_cfg, _ctx(tmp_path / "run-a"))

    cfg = _tiny(f"artifacts_dir={tmp_path / 'b'}", *SFT_QUICK)

    def crash(*args, **kwargs):
        raise RuntimeError("killed after the last checkpoint (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(sft, "merge_trained", crash)
        with pytest.raises(RuntimeError, match="simulated"):
            pipeline.run_stage("sft", cfg, _ctx(tmp_path / "run-b1"))
    assert list((tmp_path / "b").glob("sft/*.work/checkpoints/checkpoint-2/trainer_state.json"))
    resumed, m_resumed = pipeline.run_stage("sft", cfg, _ctx(tmp_path / "run-b2"))

    assert m_resumed["train/resumed_from_step"] == 2
    assert m_resumed["train/steps"] == m_straight["train/steps"] == 2
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed build's weights differ from the straight build's"
    assert m_resumed["eval/perplexity"] == pytest.approx(m_straight["eval/perplexity"], rel=1e-6)


# --------------------------------------------------------------------------- models (rows 2 and 7)


def test_packaged_gguf_stands_in_for_its_own_model_only(tmp_path, monkeypatch):
    from stackllama.models.resolve import locate_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = compose_cfg(["model=smollm2-135m"]).model
    empty_cache = str(tmp_path / "cache")
    kind, path = locate_model(
        model.name_or_path, empty_cache, model.gguf_package, model.gguf_file, 1.0, model.gguf_source
    )
    assert kind == "gguf" and path.name == model.gguf_file
    # a conversion cached under another name (what the old fallback left behind) is not trusted either
    stale = tmp_path / "cache" / "someone--SmolLM2-1.7B"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / ".stackllama_complete").write_text("ok\n")
    with pytest.raises(FileNotFoundError, match="not used: it is a copy of HuggingFaceTB/SmolLM2-135M-Instruct"):
        locate_model("someone/SmolLM2-1.7B", empty_cache, model.gguf_package, model.gguf_file, 1.0, model.gguf_source)


def test_reward_scorer_refuses_a_causal_lm_folder():
    """Eval and PPO load reward models through RewardScorer.from_pretrained: a causal LM would
    load with a random score head; it is refused, and a folder with a saved head loads."""
    from stackllama.models.resolve import NotAModelFolder
    from stackllama.reward import RewardScorer

    with pytest.raises(NotAModelFolder, match="is not a reward model: its checkpoint holds no score head"):
        RewardScorer.from_pretrained(model_folder(_tiny().model))
    scorer = RewardScorer.from_pretrained(tiny_reward_folder())
    assert scorer.score(["Why?"], ["Because."]).shape == (1,)


# --------------------------------------------------------------------------- held-out SFT texts (row 10)


def test_small_finetune_split_holds_out_a_fraction_and_keeps_questions_to_train_on():
    import datasets

    from stackllama.stages.sft_utils import hold_out_questions

    def dataset(questions: int, answers: int = 3):
        qs = [f"q{i}" for i in range(questions) for _ in range(answers)]
        return datasets.Dataset.from_dict({"question": qs, "text": [f"t{i}" for i in range(len(qs))]})

    train, held = hold_out_questions(dataset(16), 48, seed=0, fraction=0.1)  # the audio dump's 16 questions
    assert len(set(held["question"])) == math.ceil(0.1 * 16) == 2 and len(held) == 6
    assert len(set(train["question"])) == 14 and not set(train["question"]) & set(held["question"])
    train, held = hold_out_questions(dataset(400), 48, seed=0, fraction=0.1)  # the cap binds first
    assert len(held) == 48 and len(set(held["question"])) == 16
    train, held = hold_out_questions(dataset(3, answers=40), 500, seed=0, fraction=0.9)  # never every question
    assert len(set(train["question"])) == 1 and len(set(held["question"])) == 2
    train, held = hold_out_questions(dataset(1), 48, seed=0, fraction=0.1)  # one question: train on it
    assert len(held) == 0 and len(train) == 3
