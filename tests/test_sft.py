"""SFT stage: the CLI end to end, quantized training + merging, resume after a kill, helpers.

Everything runs on the tiny random Llama (model=tiny) for a handful of steps. A high
learning rate makes a few steps move the adapters enough for perplexity and logit checks
to mean something on a random model.
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

from stackllama.models.loader import model_folder
from tests.conftest import REPO, compose_cfg

QUICK = [
    "model=tiny",
    "logger=none",
    "data.synthetic.num_questions=60",
    "sft.seq_length=64",
    "sft.batch_size=4",
    "sft.eval_size=8",
    "sft.learning_rate=1e-2",
    "sft.warmup_steps=0",
    "sft.logging_steps=2",
    "sft.num_sample_generations=2",
    "sft.sample_max_new_tokens=8",
]
REQUIRED = [
    "train/loss",
    "eval/perplexity_before",
    "eval/perplexity",
    "train/tokens_per_second",
    "train/padding_fraction",
    "train/steps",
    "train/seconds",
    "train/resumed_from_step",
    "params/trainable",
    "params/total",
    "data/finetune_texts",
    "artifact/path",
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model steps are overhead-bound: one intra-op thread is as fast alone and far
    faster when the suite shares the 2 cores with other jobs (no thread oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), WANDB_MODE="offline")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(tmp_path: Path, run: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stackllama",
        "stage=sft",
        *QUICK,
        f"artifacts_dir={tmp_path / 'artifacts'}",
        f"hydra.run.dir={tmp_path / run}",
        *overrides,
    ]


def _run_cli(tmp_path: Path, run: str, *overrides: str, timeout: int = 300) -> tuple[dict, str]:
    proc = subprocess.run(
        _cli(tmp_path, run, *overrides), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return json.loads((tmp_path / run / "metrics.json").read_text()), output


def _context(run_dir: Path):
    from stackllama.metrics import Metrics
    from stackllama.task import RunContext
    from stackllama.tracking import Tracker

    return RunContext(run_dir, Metrics(run_dir / "metrics.json"), Tracker(), torch.device("cpu"))


def _build_in_process(tmp_path: Path, *overrides: str):
    from stackllama.pipeline import run_stage

    cfg = compose_cfg([*QUICK, f"artifacts_dir={tmp_path / 'artifacts'}", *overrides])
    folder, metrics = run_stage("sft", cfg, _context(tmp_path / "run"))
    return cfg, Path(folder), metrics


# --------------------------------------------------------------------------- end to end


def test_cli_trains_merges_and_reports(tmp_path):
    metrics, output = _run_cli(tmp_path, "run", "sft.max_steps=6")
    assert metrics["run/status"] == "completed"
    for key in REQUIRED:
        assert key in metrics, key
    assert metrics["train/steps"] == 6
    assert metrics["train/resumed_from_step"] == 0
    # packed bins as rows (PackedRowsCollator): only the tails of bins shorter than the longest are padding
    assert 0.0 <= metrics["train/padding_fraction"] < 0.05
    assert metrics["train/tokens_per_second"] > 0 and metrics["train/seconds"] > 0
    assert 0 < metrics["params/trainable"] < metrics["params/total"]  # LoRA only
    assert math.isfinite(metrics["train/loss"])
    before, after = metrics["eval/perplexity_before"], metrics["eval/perplexity"]
    assert 1 < after < before, (before, after)

    folder = Path(metrics["artifact/path"])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json"):
        assert (folder / name).exists(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["use_cache"] is True
    assert not list(folder.glob("adapter_*")), "the artifact is a merged model, not an adapter"
    samples = (tmp_path / "run" / "sft_samples.md").read_text()
    assert samples.count("## Sample") == 2


def test_settings_outside_the_key_do_not_change_the_model(tmp_path):
    """Every sft field declared not_in_key (stackllama/config.py) flipped at once: the same
    artifact key and the same weights, so sharing one artifact between such runs is right."""
    from safetensors.torch import load_file

    from stackllama.artifacts import stage_key

    observed = [
        "sft.logging_steps=1",
        "sft.save_steps=2",
        "sft.save_total_limit=1",
        "sft.eval_batch_size=3",
        "sft.num_sample_generations=1",
        "sft.sample_max_new_tokens=4",
        "sft.resume=false",
    ]
    cfg_a, folder_a, _ = _build_in_process(tmp_path / "a", "sft.max_steps=3")
    cfg_b, folder_b, _ = _build_in_process(tmp_path / "b", "sft.max_steps=3", *observed)
    assert stage_key("sft", cfg_a) == stage_key("sft", cfg_b)
    a, b = load_file(folder_a / "model.safetensors"), load_file(folder_b / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_full_finetune_without_packing_counts_padding(tmp_path):
    """lora=none trains every weight and saves the model itself; unpacked batches pad."""
    from transformers import AutoModelForCausalLM

    _, folder, metrics = _build_in_process(
        tmp_path, "lora=none", "sft.packing=false", "sft.max_steps=3", "sft.learning_rate=1e-3"
    )
    assert metrics["params/trainable"] == metrics["params/total"]
    assert 0 < metrics["train/padding_fraction"] < 1
    assert metrics["eval/perplexity"] < metrics["eval/perplexity_before"]
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    assert sum(p.numel() for p in model.parameters()) == metrics["params/total"]


# --------------------------------------------------------------------------- quantized + merge


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_quantized_lora_merges_into_plain_model(tmp_path, quant):
    """The merged folder is a plain model equal to base + adapter.

    Two comparisons on the same batch:
    * against the unquantized base with the saved adapter applied unmerged (what the merge
      folds): only float32 summation order differs, so atol 1e-4 on logits of ~1;
    * against the quantized base with the adapter (the model as trained): the merge puts
      the adapter on the original full-precision weights, as the article does, so the gap
      is the base's own quantization error (nf4 ~0.09, int8 ~0.007 on logits of ~1 here,
      int8 also quantizing activations); we bound it by twice that error, measured on the
      base models, so merging adds no error of its own.
    """
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stackllama.models.loader import keep_4bit_layers_trainable, load_model, load_tokenizer, model_folder

    cfg, folder, metrics = _build_in_process(tmp_path, f"quantization={quant}", "lora=default", "sft.max_steps=4")
    assert metrics["eval/perplexity"] < metrics["eval/perplexity_before"], "the quantized model did not learn"
    assert math.isfinite(metrics["eval/perplexity_merged"])

    merged = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert not any(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in merged.modules())
    assert getattr(merged.config, "quantization_config", None) is None

    base_path = model_folder(cfg.model)
    tok = load_tokenizer(base_path)
    adapter = folder.with_name(folder.name + ".work") / "adapter"

    def quantized():
        model = load_model(base_path, "causal_lm", cfg.quantization, None, tokenizer=tok, trainable=False)
        keep_4bit_layers_trainable(model)  # same matmul path as in training, not the bf16 inference kernel
        return model

    models = {
        "merged": merged,
        "unmerged": PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_path)), str(adapter)),
        "trained": PeftModel.from_pretrained(quantized(), str(adapter)),
        "base": AutoModelForCausalLM.from_pretrained(str(base_path)),
        "qbase": quantized(),
    }
    batch = tok(
        [
            "Question: How do I sort a list?\n\nAnswer: Use sorted(xs, key=f).",
            "Question: Why?\n\nAnswer: because it is",
        ],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        logits = {name: m.eval()(**batch).logits for name, m in models.items()}
    mask = batch["attention_mask"].bool()

    def gap(a: str, b: str) -> float:
        return float((logits[a] - logits[b])[mask].abs().max())

    assert gap("merged", "unmerged") < 1e-4
    quant_error = gap("base", "qbase")
    assert gap("merged", "trained") <= 2 * quant_error + 1e-4, (gap("merged", "trained"), quant_error)
    # the adapter really moved the model (gaps above ~0.8 here), so the checks above have teeth
    assert gap("merged", "base") > 0.2 and gap("trained", "qbase") > 0.2, "the adapter changed nothing"


# --------------------------------------------------------------------------- resume


def test_resume_after_kill(tmp_path):
    """SIGKILL the CLI once a checkpoint is complete; the same command resumes from it."""
    overrides = ("sft.max_steps=16", "sft.save_steps=2", "sft.logging_steps=1")
    proc = subprocess.Popen(
        _cli(tmp_path, "first", *overrides),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if list((tmp_path / "artifacts").glob("sft/*.work/checkpoints/checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the first run ended before it could be killed mid-training"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    metrics, output = _run_cli(tmp_path, "second", *overrides)
    assert metrics["run/status"] == "completed"
    assert metrics["train/resumed_from_step"] > 0
    assert f"(step {metrics['train/resumed_from_step']})" in output
    assert "Resuming SFT from" in output
    assert metrics["train/steps"] == 16


# --------------------------------------------------------------------------- helpers


def test_hold_out_is_by_question_and_deterministic():
    import datasets

    from stackllama.stages.sft_utils import hold_out_questions

    qs = [f"q{i // 3}" for i in range(30)]  # 10 questions x 3 answers
    ds = datasets.Dataset.from_dict({"question": qs, "answer": ["a"] * 30, "text": [f"t{i}" for i in range(30)]})
    train, held = hold_out_questions(ds, 7, seed=0)
    assert len(held) == 7
    assert not set(train["question"]) & set(held["question"])
    again_train, again_held = hold_out_questions(ds, 7, seed=0)
    assert held["text"] == again_held["text"] and train["text"] == again_train["text"]
    assert hold_out_questions(ds, 7, seed=1)[1]["text"] != held["text"]


def test_perplexity_ignores_padding_and_batching():
    """Batched (right-padded) and one-by-one scoring give the same token-weighted NLL."""
    from transformers import AutoModelForCausalLM

    from stackllama.models.loader import load_tokenizer, model_folder
    from stackllama.stages.sft_utils import token_nll

    cfg = compose_cfg(["model=tiny"])
    path = model_folder(cfg.model)
    tok, model = load_tokenizer(path), AutoModelForCausalLM.from_pretrained(str(path))
    texts = ["Question: a?\n\nAnswer: b", "Question: a much longer question here?\n\nAnswer: and a longer answer too"]
    batched = token_nll(model, tok, texts, 64, 4, "cpu")
    single = [token_nll(model, tok, [t], 64, 1, "cpu") for t in texts]
    assert batched[1] == sum(n for _, n in single)
    assert batched[0] == pytest.approx(sum(s for s, _ in single), rel=1e-5)
    assert token_nll(model, tok, texts, 8, 4, "cpu")[1] == 2 * 7  # truncated to 8 tokens, 7 predicted


def test_token_counting_collator():
    from stackllama.stages.sft_utils import TokenCountingCollator

    padded = TokenCountingCollator(
        lambda ex: {"input_ids": torch.zeros(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])}
    )
    padded([{}])
    assert (padded.real_tokens, padded.total_tokens, padded.padding_fraction) == (6, 8, 0.25)
    free = TokenCountingCollator(lambda ex: {"input_ids": torch.zeros(1, 9), "position_ids": torch.zeros(1, 9)})
    free([{}])
    assert free.padding_fraction == 0.0 and free.real_tokens == 9
    rows = TokenCountingCollator(lambda ex: {"input_ids": torch.zeros(2, 5), "position_ids": torch.zeros(2, 5)})
    rows([{"input_ids": [1] * 5}, {"input_ids": [1] * 3}])  # two packed bins, the second padded by 2
    assert (rows.real_tokens, rows.total_tokens) == (8, 10)


def test_packed_rows_keep_texts_apart_and_give_the_flattened_row_s_loss():
    """Bins as rows: position ids restart at each text, labels skip each text's first token and the
    padding; the model's loss equals TRL's one flattened padding-free row's, and each text's
    log-likelihood is what it gets alone (no attention across texts)."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from stackllama.stages.sft_utils import PackedRowsCollator

    examples = [
        {"input_ids": [5, 6, 7, 8, 9, 10, 11], "seq_lengths": [4, 3]},
        {"input_ids": [12, 13, 14, 15, 16], "seq_lengths": [5]},
    ]
    batch = PackedRowsCollator(pad_token_id=0)(examples)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, -100, 10, 11], [-100, 13, 14, 15, 16, -100, -100]]
    assert "attention_mask" not in batch  # with one, transformers would not split the rows into texts
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)

    model = AutoModelForCausalLM.from_pretrained(str(model_folder(compose_cfg(["model=tiny"]).model))).eval()
    with torch.no_grad():  # use_cache=False, as the Trainer runs it: with a cache transformers ignores packing
        rows_loss = model(**batch, use_cache=False).loss
        flat = {k: flat[k] for k in ("input_ids", "position_ids", "labels")}
        flat_loss = model(**flat, use_cache=False).loss
        alone = [  # each text on its own: summed NLL of its tokens after the first
            model(input_ids=torch.tensor([t]), labels=torch.tensor([t])).loss * (len(t) - 1)
            for t in ([5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16])
        ]
    torch.testing.assert_close(rows_loss, flat_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows_loss, sum(alone) / 9, rtol=1e-5, atol=1e-6)


def test_tracker_callback_replaces_the_keys_it_is_given():
    """SFT replaces TRL's num_tokens (the width of a position_ids batch) with the counted real tokens."""
    from types import SimpleNamespace

    from stackllama.tracking import Tracker, trainer_callback

    seen = []

    class Recorder(Tracker):
        def log(self, values, step=None):
            seen.append((dict(values), step))

    callback = trainer_callback(Recorder(), overrides=lambda: {"num_tokens": 1234.0, "absent": 1.0})
    callback.on_log(None, SimpleNamespace(global_step=3), None, logs={"num_tokens": 256, "loss": 2.5})
    assert seen == [({"train/num_tokens": 1234.0, "train/loss": 2.5}, 3)]
