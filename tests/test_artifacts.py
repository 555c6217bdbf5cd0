"""The artifact store (stackllama.artifacts), with dummy builds and no models.

* two processes needing the same artifact build it once and share the folder;
* a build killed (SIGKILL) or raising leaves nothing a later run trusts, and the next
  ``ensure`` builds again from scratch;
* keys: an upstream setting changes every downstream key, a PPO-only setting only PPO's,
  observation-only settings none; explicit model paths replace upstream artifacts.
"""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from stackllama import artifacts, pipeline
from stackllama.metrics import Metrics
from tests.conftest import compose_cfg

STAGE = "sft"


def _overrides(root: Path, *extra: str) -> list[str]:
    return ["model=tiny", "logger=none", f"artifacts_dir={root}", *extra]


def _ctx(run_dir: Path) -> SimpleNamespace:
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(run_dir=run_dir, metrics=Metrics(run_dir / "metrics.json"), tracker=None, device="cpu")


def _invocations(root: Path) -> list[str]:
    path = Path(root) / "invocations.txt"
    return path.read_text().split() if path.exists() else []


# Builds (module level: spawned processes import them by name) --------------------------


def recording_build(cfg, ctx, work_dir, out_dir, delay: float = 0.0):
    """Record the call, take ``delay`` seconds, write one file."""
    with open(Path(cfg.artifacts_dir) / "invocations.txt", "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(delay)
    (Path(out_dir) / "weights.txt").write_text("trained")
    return {"dummy/loss": 0.5}


def hanging_build(cfg, ctx, work_dir, out_dir):
    """Half-write the output, say so, then hang until killed."""
    (Path(out_dir) / "partial.txt").write_text("half a model")
    (Path(work_dir) / "checkpoint.txt").write_text("step 1")
    (Path(cfg.artifacts_dir) / "started").write_text(str(os.getpid()))
    time.sleep(600)
    return {}


def failing_build(cfg, ctx, work_dir, out_dir):
    (Path(out_dir) / "partial.txt").write_text("half a model")
    raise RuntimeError("out of memory (simulated)")


def _ensure_worker(overrides, run_dir, barrier, delay, queue):
    cfg = compose_cfg(overrides)
    ctx = _ctx(run_dir)
    barrier.wait(timeout=120)  # both processes ask at the same moment
    folder, manifest, reused = artifacts.ensure(STAGE, cfg, ctx, functools.partial(recording_build, delay=delay))
    queue.put((str(folder), manifest["key"], bool(reused)))


def _hanging_worker(overrides, run_dir):
    cfg = compose_cfg(overrides)
    artifacts.ensure(STAGE, cfg, _ctx(run_dir), hanging_build)


# Concurrency and crash safety ----------------------------------------------------------


def test_two_processes_build_a_prerequisite_once(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    overrides = _overrides(root)
    spawn = mp.get_context("spawn")
    barrier, queue = spawn.Barrier(2), spawn.Queue()
    procs = [
        spawn.Process(target=_ensure_worker, args=(overrides, tmp_path / f"run{i}", barrier, 2.0, queue))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(_invocations(root)) == 1, "the build ran more than once"
    folders = {r[0] for r in results}
    assert len(folders) == 1, f"the two jobs got different folders: {folders}"
    assert sorted(r[2] for r in results) == [False, True]  # one built it, the other waited and reused
    folder = Path(folders.pop())
    cfg = compose_cfg(overrides)
    assert folder == artifacts.stage_dir(STAGE, cfg)
    assert artifacts.is_trusted(folder) and (folder / "weights.txt").read_text() == "trained"
    manifest = artifacts.read_manifest(folder)
    assert manifest["metrics"] == {"dummy/loss": 0.5} and manifest["key"] == folder.name

    # a third request is answered from the manifest without building
    again, _, reused = artifacts.ensure(STAGE, cfg, _ctx(tmp_path / "run3"), recording_build)
    assert reused and again == folder and len(_invocations(root)) == 1


def test_killed_build_leaves_no_trusted_artifact(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    overrides = _overrides(root)
    cfg = compose_cfg(overrides)
    final = artifacts.stage_dir(STAGE, cfg)
    proc = mp.get_context("spawn").Process(target=_hanging_worker, args=(overrides, tmp_path / "run0"))
    proc.start()
    deadline = time.time() + 120
    while not (root / "started").exists():
        assert proc.is_alive(), "the build process died before starting its build"
        assert time.time() < deadline, "the build never started"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # mid-build, holding the lock
    proc.join(timeout=30)
    assert proc.exitcode == -signal.SIGKILL

    assert not final.exists() and not artifacts.is_trusted(final)
    assert not list(root.rglob(artifacts.MANIFEST))
    # the lock died with the process: the next job builds (no wait), from a clean output folder
    folder, manifest, reused = artifacts.ensure(STAGE, cfg, _ctx(tmp_path / "run1"), recording_build)
    assert not reused and folder == final and artifacts.is_trusted(folder)
    assert len(_invocations(root)) == 1
    assert not (folder / "partial.txt").exists(), "the killed build's half-written output was trusted"
    # work_dir (checkpoints) survives for resuming
    assert (final.with_name(final.name + ".work") / "checkpoint.txt").exists()


def test_failed_build_leaves_no_trusted_artifact(tmp_path):
    root = tmp_path / "artifacts"
    cfg = compose_cfg(_overrides(root))
    ctx = _ctx(tmp_path / "run")
    final = artifacts.stage_dir(STAGE, cfg)
    with pytest.raises(RuntimeError, match="simulated"):
        artifacts.ensure(STAGE, cfg, ctx, failing_build)
    assert not final.exists() and not artifacts.is_trusted(final)
    folder, _, reused = artifacts.ensure(STAGE, cfg, ctx, recording_build)  # the lock was released
    assert not reused and artifacts.is_trusted(folder)
    assert sorted(p.name for p in folder.iterdir()) == [artifacts.MANIFEST, "weights.txt"]


# Keys ----------------------------------------------------------------------------------


def _keys(root: Path, *extra: str) -> dict[str, str]:
    cfg = compose_cfg(_overrides(root, *extra))
    return {s: artifacts.stage_key(s, cfg) for s in ("sft", "rm", "ppo")}


def test_upstream_setting_changes_every_downstream_key(tmp_path):
    base = _keys(tmp_path)
    assert _keys(tmp_path) == base  # deterministic
    assert all(k.startswith("tiny-") for k in base.values())
    changed = _keys(tmp_path, "sft.learning_rate=3e-5")
    assert all(changed[s] != base[s] for s in ("sft", "rm", "ppo"))
    rm_only = _keys(tmp_path, "rm.learning_rate=1e-5")
    assert rm_only["sft"] == base["sft"] and rm_only["rm"] != base["rm"] and rm_only["ppo"] != base["ppo"]
    data = _keys(tmp_path, "data.synthetic.num_questions=99")
    assert all(data[s] != base[s] for s in base)
    seed = _keys(tmp_path, "seed=1")
    assert all(seed[s] != base[s] for s in base)
    precisions = {mode: _keys(tmp_path, f"mixed_precision={mode}") for mode in ("no", "bf16")}
    assert all(precisions["no"][s] != precisions["bf16"][s] for s in base)  # bf16 training is another model


def test_ppo_setting_changes_only_the_ppo_key(tmp_path):
    base = _keys(tmp_path)
    kl = _keys(tmp_path, "ppo.kl_coef=0.07")
    assert kl["sft"] == base["sft"] and kl["rm"] == base["rm"]
    assert kl["ppo"] != base["ppo"]
    # how a run is observed is not what it produces
    observed = _keys(
        tmp_path,
        "ppo.log_every=5",
        "sft.logging_steps=3",
        "eval.num_samples_in_report=2",
        "logger=tensorboard",
        "device=cpu",
    )
    assert observed == base
    assert _keys(tmp_path / "elsewhere") == base  # the key does not depend on where artifacts live


def test_explicit_policy_path_is_honored(tmp_path):
    root = tmp_path / "artifacts"
    policy = tmp_path / "my_policy"
    policy.mkdir()
    (policy / "config.json").write_text("{}")
    cfg = compose_cfg(_overrides(root, f"ppo.policy_path={policy}"))
    ctx = _ctx(tmp_path / "run")
    assert pipeline.explicit("ppo", "sft", cfg) == policy
    assert pipeline.plan("ppo", cfg) == ["sft", "rm"]  # the RM still trains on the SFT artifact
    given = compose_cfg(_overrides(root, f"ppo.policy_path={policy}", f"ppo.reward_model_path={policy}"))
    assert pipeline.plan("ppo", given) == []
    inputs = pipeline.resolve("ppo", given, ctx)
    assert inputs == {"sft": policy, "rm": policy}
    assert ctx.metrics["upstream/sft/path"] == str(policy) and ctx.metrics["upstream/sft/explicit"] is True
    assert not (root / "sft").exists(), "an SFT artifact was built although a policy path was given"

    # the PPO key follows the given policy, not the SFT settings it replaces
    both = [f"ppo.policy_path={policy}", f"ppo.reward_model_path={policy}"]
    assert _keys(root, *both)["ppo"] == _keys(root, *both, "sft.learning_rate=3e-5")["ppo"]
    assert _keys(root, *both)["ppo"] != _keys(root)["ppo"]
    assert _keys(root, f"ppo.policy_path={policy}")["ppo"] != _keys(root)["ppo"]

    # a path that holds no model fails loudly instead of silently building something else
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="ppo.policy_path=.*config.json"):
        pipeline.resolve("ppo", compose_cfg(_overrides(root, f"ppo.policy_path={empty}")), ctx)


def test_the_plan_follows_explicit_paths(tmp_path):
    from stackllama.stages.all import prefixed

    (tmp_path / "config.json").write_text("{}")

    def plan(stage: str, *extra: str) -> list[str]:
        return pipeline.plan(stage, compose_cfg(_overrides(tmp_path, *extra)))

    assert plan("eval") == ["sft", "rm", "ppo"] and plan("rm") == ["sft"] and plan("sft") == []
    given = [f"ppo.policy_path={tmp_path}", f"ppo.reward_model_path={tmp_path}"]
    assert plan("eval", *given) == ["ppo"]
    # the RM still needs the SFT model unless it is given a base of its own
    assert plan("eval", given[0]) == ["sft", "rm", "ppo"]
    assert plan("eval", given[0], f"rm.model_path={tmp_path}") == ["rm", "ppo"]
    assert prefixed("ppo", {"ppo/reward_mean_end": 1.0, "objective/kl_end": 2.0, "nested": {"x": 1}}) == {
        "ppo/reward_mean_end": 1.0,
        "ppo/objective/kl_end": 2.0,
    }


def _unkeyed_overrides() -> list[tuple[str, str]]:
    """(dotted key, a different valid value) for every schema field declared not_in_key that is
    not an upstream path (those are keyed through ``upstream``)."""
    import dataclasses
    import typing

    from stackllama.config import PIPELINE, Config, in_key

    defaults = Config()
    input_settings = {setting for inputs in PIPELINE.values() for setting in inputs.values() if setting}
    out = []

    def walk(schema: type, obj: object, prefix: str) -> None:
        hints = typing.get_type_hints(schema)
        for f in dataclasses.fields(schema):
            value = getattr(obj, f.name)
            if in_key(f):
                if dataclasses.is_dataclass(hints[f.name]):
                    walk(hints[f.name], value, f"{prefix}{f.name}.")
                continue
            if f"{prefix}{f.name}" in input_settings:
                continue
            if isinstance(value, bool):
                new = str(not value).lower()
            elif isinstance(value, (int, float)):
                new = str(value + 1)
            elif value is None:
                new = "7"
            else:
                new = "/tmp/elsewhere"  # the one string so declared: a cache folder
            out.append((f"{prefix}{f.name}", new))

    for name in ("model", "sft", "rm", "ppo", "eval"):
        walk(typing.get_type_hints(Config)[name], getattr(defaults, name), f"{name}.")
    return out


def test_every_not_in_key_field_leaves_every_key_unchanged(tmp_path):
    flips = _unkeyed_overrides()
    assert {"sft.logging_steps", "rm.eval_before", "ppo.save_every", "model.cache_dir"} <= {k for k, _ in flips}
    base = _keys(tmp_path)
    for key, value in flips:
        assert _keys(tmp_path, f"{key}={value}") == base, f"{key}={value} changed a key"


def test_sft_hold_out_settings_are_in_the_key(tmp_path):
    # sft.eval_size / eval_fraction choose the held-out questions, which SFT then does not train on:
    # two values are two different models (they were once left out of the key).
    base = _keys(tmp_path, "sft.eval_size=8")
    assert _keys(tmp_path, "sft.eval_size=4")["sft"] != base["sft"]
    assert _keys(tmp_path, "sft.eval_size=8", "sft.eval_fraction=0.3")["sft"] != base["sft"]


def test_a_keyed_field_unknown_to_the_key_code_is_still_keyed(tmp_path):
    # Keys come from the schema: every field is keyed unless declared not_in_key, so a setting
    # added later is never silently shared between two different models.
    assert _keys(tmp_path, "rm.min_pm_margin=3")["rm"] != _keys(tmp_path)["rm"]


def test_the_store_imports_no_stage_and_every_build_takes_its_inputs():
    """The data flow is one-way: the pipeline resolves inputs through the store; the store knows no
    stage, and no stage builds through the store (its build gets its inputs as arguments; the
    report may read its inputs' manifests)."""
    import ast
    import inspect

    from stackllama.stages import get_builder

    def modules(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        return {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }

    def from_store(path: Path) -> set[str]:
        """What a module takes from the store: names imported from it, or the module itself."""
        out = set()
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and n.module == "stackllama.artifacts":
                out |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module == "stackllama":
                out |= {"the whole module" for a in n.names if a.name == "artifacts"}
            elif isinstance(n, ast.Import):
                out |= {"the whole module" for a in n.names if a.name == "stackllama.artifacts"}
        return out

    package = Path(artifacts.__file__).parent
    assert not {m for m in modules(package / "artifacts.py") if "stages" in m or "pipeline" in m}
    for module in sorted((package / "stages").glob("*.py")):
        taken = from_store(module)
        assert taken <= {"is_trusted", "read_manifest"}, f"{module.name} takes {taken} from the artifact store"
    for stage in ("sft", "rm", "ppo"):
        assert list(inspect.signature(get_builder(stage)).parameters) == ["cfg", "ctx", "inputs", "work_dir", "out_dir"]
