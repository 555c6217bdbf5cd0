"""Sweeps end to end on the tiny model: grids (basic and submitit-local launchers), a failing
sweep point, Optuna, the W&B offline runs they leave, the sweep report, the Slurm preset.

Every sweep runs the real CLI (``python -m stackllama -m ...``) in a temporary working
directory, so job folders land in ``<tmp>/multirun_sweeps/<date>/<time>/<num>_<overrides>``
and artifacts in ``<tmp>/artifacts`` exactly as they would in the repository. The tiny
settings come from an ``experiment`` option written into a temporary config dir (added with
``hydra.searchpath``): Hydra leaves config-file values out of the job folder names, so those
read as on the command line of a real sweep (``0_ppo.kl_coef=0.02,stage=ppo``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackllama import report
from stackllama.models.loader import model_folder
from tests.conftest import REPO, compose_cfg, tiny_reward_folder

TINY_EXPERIMENT = """\
# @package _global_
# The recipe at toy scale (tests): each stage takes seconds on the tiny random Llama.
defaults:
  - override /model: tiny
# fp32 on every CPU: auto picks bf16 only on CPUs with bf16 instructions, and the figures would differ
mixed_precision: "no"
data:
  synthetic:
    num_questions: 60
sft: {max_steps: 4, seq_length: 64, eval_size: 8, num_sample_generations: 1, sample_max_new_tokens: 8,
      warmup_steps: 0, logging_steps: 2}
rm: {max_length: 128, max_steps: 4, max_eval_pairs: 8, logging_steps: 2}
ppo: {total_episodes: 8, batch_size: 4, mini_batch_size: 2, min_new_tokens: 4, max_new_tokens: 9, learning_rate: 5.0e-5,
      sample_every: 1, num_samples: 2}
logger: {backend: none}
"""


def _tiny_folder() -> Path:
    return model_folder(compose_cfg(["model=tiny"]).model)


def make_workdir(root: Path) -> Path:
    """A working directory with ``experiment=tiny`` (builds SFT/RM) and ``experiment=tiny_fixed``
    (PPO on the tiny base as the policy and, with a score head, as the reward model: no SFT/RM to build)."""
    conf = root / "conf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "tiny.yaml").write_text(TINY_EXPERIMENT)
    tiny = _tiny_folder()
    (conf / "tiny_fixed.yaml").write_text(
        "# @package _global_\ndefaults:\n  - tiny\n"
        f"ppo:\n  policy_path: {tiny}\n  reward_model_path: {tiny_reward_folder()}\n"
    )
    return root


def run_cli(workdir: Path, *args: str, timeout: int = 600, module: str = "stackllama") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STACKLLAMA_ARTIFACTS", "WANDB_"))}
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        WANDB_MODE="offline",
        HYDRA_FULL_ERROR="1",
        WANDB_SILENT="true",
    )
    cmd = [sys.executable, "-m", module, "-m", f"hydra.searchpath=[file://{workdir / 'conf'}]", *args]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def the_sweep(workdir: Path) -> Path:
    """The one sweep folder multirun_sweeps/<date>/<time> under ``workdir``."""
    sweeps = sorted((workdir / "multirun_sweeps").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def job_metrics(sweep: Path) -> dict[str, dict]:
    return {job.name: json.loads((job / "metrics.json").read_text()) for job in report.find_jobs(sweep)}


def objective(metrics: dict) -> float:
    value = metrics.get("run/objective")
    return float(value) if value is not None else float("nan")


# --------------------------------------------------------------------------- W&B offline files


def read_wandb_records(path: Path) -> list:
    """Every record of a ``.wandb`` transaction log, parsed with wandb's own protobufs.

    The file is a 7-byte header (``:W&B``, magic 0xBEE1, version) and then LevelDB-log style
    32 KiB blocks of chunks: crc32 (4 bytes), length (2), type (1: full, 2: first, 3: middle,
    4: last) and the payload: one serialized ``wandb.proto.wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:  # padding up to the end of the block
            pos += left
            continue
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            records.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            records.append(pending + data)
            pending = b""
    parsed = []
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        parsed.append(record)
    return parsed


def wandb_run(job_dir: Path) -> dict:
    """What the job's offline W&B run holds: run header, config, history, summary, exit code, tables."""
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"{job_dir}: expected one W&B run, found {runs}"
    files = list(runs[0].glob("run-*.wandb"))
    assert len(files) == 1
    out: dict = {"history": [], "summary": {}, "config": {}, "exit_code": None, "dir": runs[0]}
    for record in read_wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out.update(
                group=record.run.run_group,
                job_type=record.run.job_type,
                tags=list(record.run.tags),
                name=record.run.display_name,
            )
            for item in record.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "exit":
            out["exit_code"] = record.exit.exit_code
    out["tables"] = sorted(runs[0].glob("files/media/table/**/*.table.json"))
    return out


# --------------------------------------------------------------------------- a sweep with a failing point


@pytest.fixture(scope="module")
def failing_sweep(tmp_path_factory) -> Path:
    """Basic launcher, W&B offline: three PPO jobs, the last with a learning rate the config check
    refuses (inside the run, after the tracker opened)."""
    workdir = make_workdir(tmp_path_factory.mktemp("failing"))
    run_cli(
        workdir,
        "experiment=tiny_fixed",
        "stage=ppo",
        "logger.backend=wandb",
        "logger.tags=[test]",
        "ppo.learning_rate=5e-5,1e-4,-1.0",
    )
    return the_sweep(workdir)


def test_failing_job_does_not_stop_the_grid(failing_sweep):
    jobs = report.find_jobs(failing_sweep)
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1", "2"]
    assert jobs[2].name.startswith("2_") and "ppo.learning_rate=-1.0" in jobs[2].name
    metrics = job_metrics(failing_sweep)
    status = {name.split("_", 1)[0]: m["run/status"] for name, m in metrics.items()}
    assert status == {"0": "completed", "1": "completed", "2": "failed"}
    failed = metrics[jobs[2].name]
    assert "ppo.learning_rate=-1.0 is out of range: must be > 0" in failed["run/error"]
    for job in jobs[:2]:  # the others ran to the end and returned their objective
        m = metrics[job.name]
        assert m["ppo/steps"] == 2 and math.isfinite(objective(m)) and m["run/objective"] == m["ppo/objective"]

    outputs = report.write_summary(failing_sweep)
    text = outputs["markdown"].read_text()
    assert "3 jobs: 2 completed, 1 failed" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 3  # header + one row per job
    assert "| 2 | -1.0 | failed |" in text
    assert "Failed jobs:" in text and "ppo.learning_rate=-1.0 is out of range" in text
    rows = list(csv.DictReader(outputs["csv"].open()))
    assert [r["run/status"] for r in rows] == ["completed", "completed", "failed"]
    assert [float(r["override:ppo.learning_rate"]) for r in rows] == [5e-5, 1e-4, -1.0]


def test_wandb_offline_runs_of_a_sweep(failing_sweep):
    """One W&B run per job, grouped by the sweep, job type = stage, the resolved config, tags,
    the PPO metrics and the sample table; the failed job's run is closed with exit code 1."""
    jobs = report.find_jobs(failing_sweep)
    runs = [wandb_run(job) for job in jobs]
    group = f"{failing_sweep.parent.name}_{failing_sweep.name}"  # <date>_<time>
    for job, run, lr in zip(jobs, runs, (5e-5, 1e-4, -1.0)):
        assert run["group"] == group and run["job_type"] == "ppo"
        assert run["name"] == job.name
        assert {"test", "ppo", "multirun", "launcher:basic", "model:tiny"} <= set(run["tags"])
        config = run["config"]  # the resolved config, every group, plus the job's overrides
        assert config["ppo"]["learning_rate"] == lr and config["stage"]["name"] == "ppo"
        assert config["model"]["name"] == "tiny" and config["ppo"]["total_episodes"] == 8
        assert (
            f"ppo.learning_rate={job.name.split('ppo.learning_rate=')[1].split(',')[0]}" in config["hydra"]["overrides"]
        )

    for run in runs[:2]:
        assert run["exit_code"] == 0
        steps = [h for h in run["history"] if "ppo/step" in h]
        assert [h["ppo/step"] for h in steps] == [1, 2]
        for key in ("env/reward_mean", "objective/kl", "ppo/loss/policy", "ppo/loss/value", "objective/kl_coef"):
            assert all(math.isfinite(h[key]) for h in steps), key
        assert run["summary"]["run/status"] == "completed"
        assert run["summary"]["ppo/objective"] == pytest.approx(run["summary"]["run/objective"])
        # the sample table: referenced from the history, its rows in files/media/table
        assert any(h.get("ppo/samples/_type") == "table-file" for h in run["history"])
        assert len(run["tables"]) == 2, run["tables"]  # ppo.sample_every=1: one table per step
        for path, step in zip(run["tables"], (1, 2)):
            table = json.loads(path.read_text())
            assert table["columns"] == ["step", "query", "response", "reward", "kl", "gold"]
            assert len(table["data"]) == 2 and all(row[0] == step and row[1] and row[2] for row in table["data"])

    failed = runs[2]
    assert failed["exit_code"] == 1  # marked failed, and closed: the exit record is written at finish
    assert failed["summary"]["run/status"] == "failed"
    assert "ppo.learning_rate=-1.0 is out of range" in failed["summary"]["run/error"]
    assert not [h for h in failed["history"] if "ppo/step" in h]


# --------------------------------------------------------------------------- submitit, local executor


@pytest.mark.slow
def test_submitit_local_grid_builds_sft_and_rm_once(tmp_path):
    """A 2x2 PPO grid through submitit's local executor (each job its own process, all at once).
    SFT and RM are needed by all four jobs: one builds each under the artifact lock, the others
    wait and reuse it, and all four PPO runs start from the same state."""
    workdir = make_workdir(tmp_path)
    run_cli(
        workdir,
        "hydra/launcher=local",
        "experiment=tiny",
        "stage=ppo",
        "ppo.kl_coef=0.02,0.2",
        "ppo.learning_rate=1e-5,1e-4",
    )
    sweep = the_sweep(workdir)
    assert sweep.parent.parent.name == "multirun_sweeps"
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) == [
        "0_ppo.kl_coef=0.02,ppo.learning_rate=1e-05,stage=ppo",
        "1_ppo.kl_coef=0.02,ppo.learning_rate=0.0001,stage=ppo",
        "2_ppo.kl_coef=0.2,ppo.learning_rate=1e-05,stage=ppo",
        "3_ppo.kl_coef=0.2,ppo.learning_rate=0.0001,stage=ppo",
    ]
    assert any((sweep / ".submitit").iterdir()), "submitit did not run the jobs"
    metrics = job_metrics(sweep)
    assert [m["run/status"] for m in metrics.values()] == ["completed"] * 4

    artifacts = workdir / "artifacts"
    for stage in ("sft", "rm"):
        built = [p for p in (artifacts / stage).iterdir() if (p / "manifest.json").exists()]
        assert len(built) == 1, f"{stage} built {len(built)} times"
        assert {m[f"upstream/{stage}/path"] for m in metrics.values()} == {str(built[0])}
        builders = [name for name, m in metrics.items() if m[f"upstream/{stage}/reused"] is False]
        assert len(builders) == 1, f"{stage}: jobs that built it: {builders}"
        manifest = json.loads((built[0] / "manifest.json").read_text())
        assert Path(manifest["run_dir"]).name == builders[0]
    assert len({p.name for p in (artifacts / "ppo").iterdir() if (p / "manifest.json").exists()}) == 4
    # the job that built SFT and RM first still started PPO from the same RNG state as the others
    assert len({m["ppo/reward_mean_start"] for m in metrics.values()}) == 1

    outputs = report.write_summary(sweep)
    text = outputs["markdown"].read_text()
    assert "4 jobs: 4 completed" in text
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 4
    assert "Shared overrides: `experiment=tiny` `stage=ppo`" in text
    assert outputs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- Optuna


def test_optuna_sweep_returns_a_best_value(tmp_path):
    """sweep=optuna_ppo, 3 trials: every trial returns its run's objective to Optuna, a trial
    that fails (a learning rate torch refuses) becomes a FAIL trial instead of ending the study,
    and the best value lands in optimization_results.yaml."""
    workdir = make_workdir(tmp_path)
    proc = run_cli(
        workdir,
        "experiment=tiny_fixed",
        "sweep=optuna_ppo",
        "hydra.sweeper.n_trials=3",
        "ppo.batch_size=4",  # a fixed value: Optuna leaves it out of its search space
        'hydra.sweeper.params={ppo.learning_rate:"choice(1e-4,-1.0,5e-5)"}',
    )
    sweep = the_sweep(workdir)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    metrics = job_metrics(sweep)
    assert len(metrics) == 3
    completed = {name: m for name, m in metrics.items() if m["run/status"] == "completed"}
    failed = [m for m in metrics.values() if m["run/status"] == "failed"]
    assert completed and failed, [m["run/status"] for m in metrics.values()]  # sampler seed 0: 2 + 1
    best_name, best = max(completed.items(), key=lambda kv: objective(kv[1]))
    assert results["best_value"] == pytest.approx(objective(best))
    assert set(results["best_params"]) == {"ppo.kl_coef", "ppo.learning_rate"}
    best_overrides = dict(
        o.split("=", 1) for o in yaml.safe_load((sweep / best_name / ".hydra" / "overrides.yaml").read_text())
    )
    for key, value in results["best_params"].items():
        assert float(best_overrides[key]) == pytest.approx(float(value))
    assert "Best value" in proc.stdout + proc.stderr

    text = report.write_summary(sweep)["markdown"].read_text()
    assert "Optuna (optimization_results.yaml)" in text and "best_value" in text
    assert f"in job {best_name.split('_', 1)[0]}" in text


# --------------------------------------------------------------------------- report on its own


def _fake_job(sweep: Path, num: int, overrides: list[str], metrics: dict | None) -> None:
    job = sweep / f"{num}_{','.join(o for o in overrides if not o.startswith('seed'))}"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))


def test_report_table_and_frontier(tmp_path):
    """kl_coef x seed: the table shows the swept values, marks failed and missing jobs; the
    frontier holds exactly the jobs no other beats at lower KL."""
    sweep = tmp_path / "multirun_sweeps" / "2026-01-01" / "00-00-00"
    points = {0.02: (9.0, 2.0), 0.05: (6.0, 1.8), 0.1: (3.0, 1.0), 0.2: (1.0, 0.2)}
    num = 0
    for kl_coef, (kl, reward) in points.items():
        for seed in (0, 1):
            m = {
                "run/status": "completed",
                "objective/kl_end": kl + seed * 0.5,
                "ppo/reward_mean_end": reward - seed * 0.1,
                "gold/score_end": reward / 2,
                "ppo/objective": reward,
                "run/objective": reward - seed * 0.1,
            }
            _fake_job(sweep, num, ["stage=ppo", f"ppo.kl_coef={kl_coef}", f"seed={seed}"], m)
            num += 1
    _fake_job(
        sweep,
        num,
        ["stage=ppo", "ppo.kl_coef=0.5", "seed=0"],
        {"run/status": "failed", "run/error": "ValueError: boom", "run/objective": "nan"},
    )
    _fake_job(sweep, num + 1, ["stage=ppo", "ppo.kl_coef=0.5", "seed=1"], None)

    outputs = report.write_summary(sweep)
    text = outputs["markdown"].read_text()
    assert "10 jobs: 8 completed, 1 failed, 1 missing" in text
    assert "Shared overrides: `stage=ppo`" in text
    assert "| job | ppo.kl_coef | seed | run/status |" in text
    assert "- job 8: failed ValueError: boom" in text and "- job 9: missing" in text
    assert "Best objective (maximize): 2 in job 0" in text
    png = outputs["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    front = report.pareto_front([(kl + s * 0.5, r - s * 0.1) for kl, r in points.values() for s in (0, 1)])
    assert front == sorted((kl, r) for kl, r in points.values())  # seed 1 is dominated everywhere

    # the command line prints the table and where the files went
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "stackllama.report", str(sweep)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| job | ppo.kl_coef | seed |" in proc.stdout and f"plot: {sweep / 'frontier.png'}" in proc.stdout


# --------------------------------------------------------------------------- launcher presets


def test_slurm_preset_becomes_one_process_per_gpu(tmp_path, monkeypatch):
    """hydra/launcher=slurm -> the sbatch script submitit would submit (no cluster needed: a fake
    ``srun`` on PATH satisfies submitit's check): partition, nodes, GPUs, one task per GPU, time,
    memory, the array throttle, the requeue signal."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from stackllama.train import config_dir

    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        cfg = compose(
            config_name="config",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.gpus_per_node=4",
                "hydra.launcher.nodes=2",
                "hydra.launcher.timeout_min=90",
                "stage=sft",
                f"hydra.sweep.dir={tmp_path / 'sweep'}",
            ],
        )
    launcher_cfg = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher_cfg["tasks_per_node"] == 4 and launcher_cfg["mem_gb"] == 64
    launcher = instantiate(cfg.hydra.launcher)  # the plugin's SlurmLauncher, as Hydra builds it

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    # the translation BaseSubmititLauncher.launch() applies before submitting
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=str(tmp_path / "submitit"), slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit x", "uid")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=90",
        "#SBATCH --job-name=stackllama",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script, f"{line!r} not in:\n{script}"
    assert "srun" in script  # each of the 8 tasks runs the job; stackllama.distributed ranks them


def test_local_preset_and_ready_sweeps_compose():
    """Each ready sweep composes with each launcher preset, and names only schema keys."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from stackllama.config import validate
    from stackllama.train import config_dir

    sweeps = sorted(p.stem for p in (REPO / "conf" / "sweep").glob("*.yaml"))
    assert {"kl_coef", "learning_rate", "batch_size", "response_length", "optuna_ppo"} <= set(sweeps)
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        for launcher in ("local", "slurm"):
            for sweep in sweeps:
                cfg = compose(
                    config_name="config",
                    return_hydra_config=True,
                    overrides=[f"hydra/launcher={launcher}", f"sweep={sweep}"],
                )
                assert cfg.stage.name == ("eval" if sweep == "methods" else "ppo"), sweep
                validate(cfg)
                params = OmegaConf.to_container(cfg.hydra.sweeper.params)
                assert params, sweep
                for key, values in params.items():
                    if (REPO / "conf" / key).is_dir():  # a config group (method=ppo,rloo,...): each option exists
                        assert all((REPO / "conf" / key / f"{v}.yaml").exists() for v in str(values).split(",")), key
                    elif key != "seed":
                        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", (sweep, key)
        cfg = compose(config_name="config", return_hydra_config=True, overrides=["hydra/launcher=local"])
        assert cfg.hydra.launcher.tasks_per_node == 1 and cfg.hydra.launcher.gpus_per_node == 0
        assert "LocalLauncher" in cfg.hydra.launcher._target_
        cfg = compose(config_name="config", return_hydra_config=True, overrides=["sweep=optuna_ppo"])
        assert "optuna" in cfg.hydra.sweeper._target_.lower() and cfg.hydra.sweeper.direction == "maximize"


def test_report_recipe_table_and_curves(tmp_path):
    """stage=all x seed: each job's stage times, RM accuracy beside its gold ceiling, PPO start ->
    end with standard errors, win rates ±, the mean over seeds, and the per-step curves."""
    sweep = tmp_path / "multirun_sweeps" / "2026-01-01" / "00-00-00"
    for seed in (0, 1, 2):
        art = tmp_path / f"ppo{seed}"
        art.mkdir()
        with open(art / "history.jsonl", "w") as fh:
            for step in range(1, 5):
                fh.write(
                    json.dumps(
                        {
                            "ppo/step": step,
                            "env/reward_mean": step + seed,
                            "env/reward_std": 1.0,
                            "env/episodes": 16.0,
                            "gold/score_mean": 0.1 * step,
                            "gold/score_std": 0.5,
                        }
                    )
                    + "\n"
                )
        m = {
            "run/status": "completed",
            "run/stage": "all",
            "time/stage/sft_s": 60.0 + seed,
            "time/stage/rm_s": 90.0,
            "time/stage/ppo_s": 100.0,
            "time/stage/eval_s": 30.0,
            "time/total_s": 300.0,
            "rm/eval/accuracy": 0.86 + 0.01 * seed,
            "rm/eval/gold_accuracy": 0.965,
            "ppo/reward_mean_start": 1.0,
            "ppo/reward_mean_start_stderr": 0.25,
            "ppo/reward_mean_end": 4.0,
            "ppo/reward_mean_end_stderr": 0.25,
            "eval/win_rate_vs_sft": 0.75,
            "eval/win_rate_stderr": 0.0625,
            "eval/gold_win_rate_vs_sft": 0.6,
            "eval/num_questions": 48,
            "upstream/ppo/path": str(art),
        }
        _fake_job(sweep, seed, ["stage=all", f"seed={seed}"], m)
    outputs = report.write_summary(sweep)
    text = outputs["markdown"].read_text()
    assert "## The recipe, job by job" in text
    assert "| job | seed | SFT s | RM s | PPO s | eval s | total s | RM acc | gold ceiling |" in text
    assert (
        "| 0 | 0 | 60 | 90 | 100 | 30 | 300 | 0.86 | 0.965 | 1 ± 0.25 | 4 ± 0.25 | 0.75 ± 0.062 | 0.6 ± 0.071 |" in text
    )
    assert "| mean of 3 |  | 61 ± 1 |" in text and "0.87 ± 0.01" in text
    assert outputs["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "ppo_curves.png" in text


def test_optuna_study_continues_across_invocations_with_sqlite_storage(tmp_path):
    """hydra.sweeper.storage=sqlite:///...: a second invocation with the same study name adds its
    trials to the first's (an interrupted study resumes; parallel Slurm jobs share one), which needs
    the SQLAlchemy 1.4 the sweeps extra pins (optuna 2.10's SQL storage predates SQLAlchemy 2)."""
    import optuna

    workdir = make_workdir(tmp_path)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [
        "experiment=tiny_fixed",
        "sweep=optuna_ppo",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=resumable",
        "hydra.sweeper.n_trials=1",
        "ppo.batch_size=4",
    ]
    run_cli(workdir, *common)
    # each invocation its own sampler seed: with the same one it would draw the first one's point again
    run_cli(workdir, *common, "hydra.sweeper.sampler.seed=1")
    study = optuna.load_study(study_name="resumable", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 2
