"""Bad settings and bad inputs fail fast and say why (issue 15).

One table of cases, each run through ``stackllama.task.run_task`` (the CLI's entry, in-process
for speed; a few also through the real CLI for the exit code). Every case asserts:

* the run fails (an exception in-process, exit code 1 from the CLI) and ``metrics.json``
  says ``run/status: failed``;
* the message names the key or the file and what to do about it;
* for settings, that nothing was built or loaded: the artifact store (every stage's way to a
  model) and ``from_pretrained`` are replaced by spies that fail the test when called, and no
  artifact folder appears. Input cases (data files) fail inside the SFT build's data step, so
  only ``from_pretrained`` is spied on there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from stackllama import artifacts, task
from tests.conftest import REPO, compose_cfg

BASE = ["model=tiny", "logger=none"]


@dataclass
class Case:
    id: str
    overrides: list[str]
    expect: list[str]  # substrings of the error message: the key or file, and the fix
    kind: str = "setting"  # "setting": nothing may be built or loaded; "input": no weights may load
    files: Callable[[Path], dict[str, str]] | None = None  # writes the inputs, returns {placeholder: path}
    compose_error: bool = False  # Hydra/OmegaConf refuse it while composing (types, unknown keys without +)


# --------------------------------------------------------------------------- input files


def _junk_config(tmp: Path) -> dict[str, str]:
    folder = tmp / "junk"
    folder.mkdir()
    (folder / "config.json").write_text('{"just": "some json"}')
    (folder / "tokenizer_config.json").write_text("{}")
    empty = tmp / "empty"
    empty.mkdir()
    return {"junk": str(folder), "empty": str(empty)}


def _causal_lm(tmp: Path) -> dict[str, str]:
    from stackllama.models.loader import model_folder

    return {"causal": str(model_folder(compose_cfg(["model=tiny"]).model))}


XML_HEAD = b'<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'


def _xml_row(**attrs: str) -> bytes:
    return ("  <row " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + " />\n").encode()


def _dumps(tmp: Path) -> dict[str, str]:
    questions = b"".join(
        _xml_row(Id=str(i), PostTypeId="1", Score="1", Title=f"Q{i}", Body="&lt;p&gt;Why?&lt;/p&gt;")
        for i in range(1, 41)
    )
    empty = b"".join(
        _xml_row(
            Id=str(i),
            PostTypeId="1" if i <= 20 else "2",
            Score="1",
            Body="",
            **({"ParentId": str(i - 20)} if i > 20 else {}),
        )
        for i in range(1, 61)
    )
    out = {}
    for name, body in {"noanswers": questions, "emptybodies": empty}.items():
        (tmp / name).mkdir()
        (tmp / name / "Posts.xml").write_bytes(XML_HEAD + body + b"</posts>\n")
        out[name] = str(tmp / name)
    (tmp / "truncated.xml").write_bytes((XML_HEAD + questions)[:-40])
    (tmp / "garbage.xml").write_bytes(b"\x00\x01 this is not xml <<<")
    out.update(
        truncated=str(tmp / "truncated.xml"),
        garbage=str(tmp / "garbage.xml"),
        missing=str(tmp / "nope.stackexchange.com"),
    )
    # paired / h4 copies whose rows lack the columns the layouts need
    (tmp / "paired.jsonl").write_text(
        "".join(json.dumps({"qid": i, "question": "How?", "answer": "So."}) + "\n" for i in range(200))
    )
    (tmp / "h4.jsonl").write_text("".join(json.dumps({"qid": i, "title": "How?"}) + "\n" for i in range(50)))
    out.update(paired=str(tmp / "paired.jsonl"), h4=str(tmp / "h4.jsonl"))
    return out


# --------------------------------------------------------------------------- the table

DUMP = ["stage=sft", "data=stackexchange_dump"]
SMOL = ["model=smollm2-135m", "model.cache_dir={cache}"]  # an empty model cache of the test's own


def _own_cache(tmp: Path) -> dict[str, str]:
    return {"cache": str(tmp / "model-cache")}


CASES = [
    # rows 4 and 5 of the issue: ranges in the schema, checked before anything loads
    Case("cliprange", ["ppo.cliprange=-1"], ["ppo.cliprange=-1.0", "must be > 0"]),
    Case("kl_coef", ["ppo.kl_coef=-1"], ["ppo.kl_coef=-1.0", "must be >= 0"]),
    Case("ppo_total_episodes", ["stage=ppo", "ppo.total_episodes=0"], ["ppo.total_episodes=0", "must be >= 1"]),
    Case("sft_max_steps", ["sft.max_steps=0"], ["sft.max_steps=0", "must be >= 1"]),
    Case(
        "plus_typo",
        ["+sft.learnign_rate=1"],
        ["sft.learnign_rate is not a setting of sft", "did you mean sft.learning_rate"],
    ),
    Case(
        "plus_root", ["+learning_rate=1"], ["learning_rate is not a setting of the root config", "drop the +override"]
    ),
    Case("ppo_batch_size", ["stage=ppo", "ppo.batch_size=0"], ["ppo.batch_size=0", "must be >= 1"]),
    Case("ppo_lr", ["stage=ppo", "ppo.learning_rate=-1e-5"], ["ppo.learning_rate=-1e-05", "must be > 0"]),
    Case("sft_lr", ["sft.learning_rate=-1"], ["sft.learning_rate=-1.0", "must be > 0"]),
    Case("rm_lr", ["stage=rm", "rm.learning_rate=0"], ["rm.learning_rate=0.0", "must be > 0"]),
    Case("lora_r", ["lora.r=0"], ["lora.r=0", "must be >= 1"]),
    Case("rm_lora_r", ["stage=rm", "rm.lora.r=0"], ["rm.lora.r=0", "must be >= 1"]),
    Case(
        "gas_3",
        ["stage=ppo", "ppo.mini_batch_size=4", "ppo.micro_batch_size=3"],
        ["ppo.mini_batch_size=4 must be a multiple of ppo.micro_batch_size=3"],
    ),
    Case("temperature", ["stage=ppo", "ppo.temperature=0"], ["ppo.temperature=0.0", "must be > 0"]),
    Case("mini_batch_0", ["stage=ppo", "ppo.mini_batch_size=0"], ["ppo.mini_batch_size=0", "must be >= 1"]),
    Case(
        "batch_multiple",
        ["ppo.batch_size=10", "ppo.mini_batch_size=4"],
        ["ppo.batch_size=10 must be a multiple of ppo.mini_batch_size=4"],
    ),
    Case(
        "lengths",
        ["ppo.min_new_tokens=40", "ppo.max_new_tokens=33"],
        ["ppo.min_new_tokens=40 must be < ppo.max_new_tokens=33"],
    ),
    Case("splits_sum", ["data.splits.finetune=0.5"], ["data.splits must sum to 1"]),
    Case("top_p", ["ppo.top_p=1.5"], ["ppo.top_p=1.5", "must be in (0, 1]"]),
    Case("lora_dropout", ["lora.dropout=1.0"], ["lora.dropout=1.0", "must be in [0, 1)"]),
    Case("rm_max_steps", ["stage=rm", "rm.max_steps=0"], ["rm.max_steps=0", "or -1"]),
    Case("rloo_needs_groups", ["ppo.advantage=rloo"], ["ppo.advantage=rloo", "ppo.samples_per_prompt >= 2"]),
    Case("groups_divide_batch", ["ppo.samples_per_prompt=3"], ["multiple of ppo.samples_per_prompt"]),
    Case("advantage_choice", ["ppo.advantage=vtrace"], ["ppo.advantage='vtrace' is not valid", "gae, rloo, grpo"]),
    Case("rm_min_pm_margin", ["stage=rm", "rm.min_pm_margin=0"], ["rm.min_pm_margin=0", "must be >= 1"]),
    Case("seed", ["seed=-1"], ["seed=-1", "must be in [0, 4294967295]"]),
    Case("nan_lr", ["ppo.learning_rate=nan"], ["ppo.learning_rate=nan", "must be > 0"]),
    Case("ratio_threshold", ["ppo.ratio_threshold=1"], ["ppo.ratio_threshold=1.0", "must be > 1"]),
    Case("eval_fraction", ["sft.eval_fraction=1"], ["sft.eval_fraction=1.0", "must be in [0, 1)"]),
    Case("dump_without_path", ["data=stackexchange_dump"], ["data.source=stackexchange_dump needs data.path="]),
    # already refused before this issue: types, unknown keys without +, enum choices
    Case("type", ["ppo.batch_size=big"], ["ppo.batch_size", "big"], compose_error=True),
    Case("unknown_key", ["sft.learnign_rate=1"], ["learnign_rate"], compose_error=True),
    Case("quant_choice", ["quantization.mode=fp4"], ["quantization.mode='fp4' is not valid", "int8, nf4"]),
    Case("stage_choice", ["stage.name=train"], ["stage.name='train' is not valid", "sft, rm, ppo"]),
    Case("precision_choice", ["mixed_precision=fp8"], ["mixed_precision='fp8' is not valid", "bf16"]),
    Case("logger_choice", ["logger.backend=mlflow"], ["logger.backend='mlflow'", "choose one of wandb, tensorboard"]),
    # rows 2, 7, 9: models that are missing or not what they claim, found before any training
    Case(
        "missing_model",
        [*SMOL, "model.name_or_path=/missing/folder"],
        [
            "model.name_or_path=/missing/folder",
            "Looked in",
            "local folder /missing/folder (does not exist)",
            "not used: it is a copy of HuggingFaceTB/SmolLM2-135M-Instruct",
        ],
        files=_own_cache,
    ),
    Case(
        "unknown_hub_id",
        [*SMOL, "model.name_or_path=nobody/no-such-model"],
        ["nobody/no-such-model", "hub (unreachable", "not used: it is a copy of"],
        files=_own_cache,
    ),
    Case(
        "junk_config",
        ["stage=ppo", "ppo.policy_path={junk}"],
        ["ppo.policy_path={junk} is not a model folder", "model_type"],
        files=_junk_config,
    ),
    Case(
        "no_config",
        ["stage=ppo", "ppo.policy_path={empty}"],
        ["ppo.policy_path={empty} is not a model folder: it holds no config.json"],
        files=_junk_config,
    ),
    Case(
        "causal_as_rm",
        ["stage=ppo", "ppo.reward_model_path={causal}"],
        ["ppo.reward_model_path={causal} is not a reward model", "no score head"],
        files=_causal_lm,
    ),
    Case(
        "missing_policy",
        ["stage=eval", "ppo.policy_path=/no/such/policy"],
        ["ppo.policy_path=/no/such/policy is not a model folder: it does not exist"],
    ),
    # row 3 and the XML intake: data with nothing usable stops at the data step, naming file and cause
    Case(
        "dump_no_answers",
        [*DUMP, "data.path={noanswers}"],
        ["No usable records in {noanswers}", "40 questions with fewer than data.min_answers=2 answers"],
        kind="input",
        files=_dumps,
    ),
    Case(
        "dump_empty_bodies",
        [*DUMP, "data.path={emptybodies}"],
        ["No usable records in {emptybodies}", "20 questions with an empty body", "non-empty Body"],
        kind="input",
        files=_dumps,
    ),
    Case(
        "paired_columns",
        ["stage=sft", "data=paired", "data.path={paired}"],
        [
            "No usable records in {paired}",
            "200 rows skipped as malformed",
            "missing columns: response_j (200 rows), response_k (200 rows)",
            "qid, question, response_j, response_k",
        ],
        kind="input",
        files=_dumps,
    ),
    Case(
        "h4_columns",
        ["stage=sft", "data=h4_preferences", "data.path={h4}"],
        ["No usable records in {h4}", "missing columns: question (50 rows), answers (50 rows)"],
        kind="input",
        files=_dumps,
    ),
    Case(
        "xml_truncated",
        [*DUMP, "data.path={truncated}"],
        ["{truncated} is not well-formed XML", "truncated"],
        kind="input",
        files=_dumps,
    ),
    Case(
        "xml_garbage", [*DUMP, "data.path={garbage}"], ["{garbage} is not well-formed XML"], kind="input", files=_dumps
    ),
    Case(
        "xml_missing",
        [*DUMP, "data.path={missing}"],
        ["Stack Exchange dump not found", "pass data.path="],
        kind="input",
        files=_dumps,
    ),
]


def _fill(text: str, paths: dict[str, str]) -> str:
    for name, path in paths.items():
        text = text.replace("{" + name + "}", path)
    return text


@pytest.fixture
def spies(monkeypatch):
    """Replace the artifact store and weight loading with spies that fail the test when used."""
    from transformers.modeling_utils import PreTrainedModel

    def refuse(what: str):
        def spy(*args, **kwargs):
            raise AssertionError(f"{what} was called for a case that should have failed before it")

        return spy

    def install(kind: str) -> None:
        monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(refuse("from_pretrained")))
        if kind == "setting":
            monkeypatch.setattr(artifacts, "ensure", refuse("artifacts.ensure (a stage build)"))

    return install


def run_in_process(tmp_path: Path, overrides: list[str], monkeypatch) -> None:
    """``run_task`` as the CLI calls it, with the Hydra run dir faked (no Hydra app is running)."""
    cfg = compose_cfg([*BASE, f"artifacts_dir={tmp_path / 'art'}", *overrides])
    job = task.JobInfo(
        run_dir=tmp_path / "run", multirun=False, group=None, name="test", tags=[], overrides=list(overrides)
    )
    monkeypatch.setattr(task, "_hydra_info", lambda cfg=None: job)
    task.run_task(cfg)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_setting_or_input_fails_fast_and_says_why(case: Case, tmp_path, monkeypatch, spies):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is never tried (as on a machine without network)
    paths = case.files(tmp_path) if case.files else {}
    overrides = [_fill(o, paths) for o in case.overrides]
    spies(case.kind)
    if case.compose_error:
        with pytest.raises((HydraException, OmegaConfBaseException)) as info:
            compose_cfg([*BASE, *overrides])
    else:
        with pytest.raises(Exception) as info:
            run_in_process(tmp_path, overrides, monkeypatch)
        assert not isinstance(info.value, AssertionError), info.value  # a spy fired: it got too far
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["run/status"] == "failed" and metrics["run/error"]
    message = str(info.value)
    for part in case.expect:
        assert _fill(part, paths) in message, (part, message)
    if case.kind == "setting":
        assert not (tmp_path / "art").exists(), "an artifact folder was created for a bad setting"
    else:
        assert not list((tmp_path / "art").glob("*/*/manifest.json")), "a bad input published an artifact"


def test_the_table_covers_at_least_30_cases():
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


CLI_CASES = [
    (["stage=ppo", "ppo.mini_batch_size=0", "ppo.cliprange=-1"], ["ppo.mini_batch_size=0", "ppo.cliprange=-1.0"]),
    (["+sft.learnign_rate=1"], ["did you mean sft.learning_rate"]),
    (
        ["model=smollm2-135m", "model.name_or_path=/missing/folder", "model.cache_dir=<tmp>/cache"],
        ["Looked in", "/missing/folder"],
    ),
]


@pytest.mark.parametrize("overrides,expect", CLI_CASES, ids=["ranges", "plus_key", "missing_model"])
def test_cli_exits_non_zero_before_loading_anything(tmp_path, overrides, expect):
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    overrides = [o.replace("<tmp>", str(tmp_path)) for o in overrides]  # never the shared model cache
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "stackllama",
            *BASE,
            *overrides,
            f"artifacts_dir={tmp_path / 'art'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    for part in expect:
        assert part in proc.stderr, (part, proc.stderr[-3000:])
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["run/status"] == "failed"
    assert not (tmp_path / "art").exists()
