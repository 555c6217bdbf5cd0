"""The benchmark scripts' own plumbing (the figures themselves come from running them, not from tests)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_bench_common_imports_where_stackllama_is_not_installed(tmp_path):
    """The TRL 1.12 baseline runs in its own venv without our package: its worker imports bench/common.py."""
    code = f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import common; print(common.rss_now_mb() > 0)"
    # -S: no site-packages, so only the working tree can provide stackllama (as in bench/.venv-trl)
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_cpu_isa_cap_makes_torch_dispatch_to_avx2_kernels(tmp_path):
    """bench_ppo.py --cpu-isa avx2: an AVX2-only CPU's code paths on any x86 CPU (the capability torch
    reports after the cap; a cap set after torch is imported is refused, it would do nothing)."""
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import common; common.limit_cpu_isa('avx2'); "
        "print(common.cpu_capability()); import torch\n"
        "try:\n    common.limit_cpu_isa('avx2')\nexcept RuntimeError:\n    print('refused')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["AVX2", "refused"]


def test_gpu_check_runs_every_step_on_cpu_in_smoke_mode(tmp_path):
    """bench/gpu_check.sh's CPU-safe parts: the pipeline, int8 and NF4 PPO, the ~1B memory step (at a tiny
    shape), each recorded with its stages' manifests; the GPU benchmark is skipped without CUDA."""
    import json
    import os

    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert report["smoke"] and report["device"] == "cpu"
    assert {k: v["status"] for k, v in steps.items()} == {
        "stage_all": "ok",
        "ppo_int8": "ok",
        "ppo_nf4": "ok",
        "bench_gpu": "skipped",
        "memory_1b": "ok",
    }, {k: v.get("error") for k, v in steps.items()}
    assert set(steps["stage_all"]["stages"]) >= {"sft", "rm", "ppo"}
    for name in ("ppo_int8", "ppo_nf4", "memory_1b"):  # each run's own PPO build is measured
        ppo = steps[name]["stages"]["ppo"]
        assert ppo["gb_per_b_params"] > 0 and ppo["params"] > 0 and ppo["build_seconds"] > 0
    assert "eval/win_rate_vs_sft" in steps["stage_all"]["figures"]


def test_the_table_names_the_cpu_of_rows_measured_on_another_machine():
    """bench/results holds PPO rows from more than one machine: a row whose JSON names another CPU
    than the table's header says which one, so no figure reads as the header machine's."""
    import json

    sys.path.insert(0, str(REPO / "bench"))
    import run_all

    row = json.loads((REPO / "bench" / "results" / "ppo_smollm2.json").read_text())
    cpu = row["machine"]["cpu_model"]
    same = run_all.build_table({"machine": row["machine"], "created": "now", "ppo_smollm2": row})
    other = run_all.build_table(
        {"machine": {**row["machine"], "cpu_model": "Another CPU"}, "created": "now", "ppo_smollm2": row}
    )
    assert f", on {cpu}" not in same
    assert f"| PPO episodes/s, full fine-tuning, smollm2-135m, fp32, on {cpu} |" in other
    assert f"| PPO peak RSS, LoRA, smollm2-135m, fp32, on {cpu} |" in other
    # The same model name, another family/model (a Zen 3 and a Zen 5 are both "AMD EPYC"):
    here = {**row["machine"], "cpu_id": f"{cpu} (family 25, model 1)"}
    there = {**row, "machine": {**row["machine"], "cpu_id": f"{cpu} (family 26, model 2)"}}
    mixed = run_all.build_table({"machine": here, "created": "now", "ppo_smollm2": there})
    assert f"| PPO episodes/s, LoRA, smollm2-135m, fp32, on {cpu} (family 26, model 2) |" in mixed
    assert mixed.startswith(f"Machine: {cpu} (family 25, model 1),")


def test_the_table_says_which_rows_ran_ours_linears_on_onednn():
    """ppo.cpu_matmul=auto resolves by the CPU: a row whose runs record oneDNN says so, others do not."""
    import json

    sys.path.insert(0, str(REPO / "bench"))
    import run_all

    row = json.loads((REPO / "bench" / "results" / "ppo_smollm2.json").read_text())
    onednn = {**row, "runs": [{**r, "cpu_matmul": "onednn" if r["side"] == "ours" else None} for r in row["runs"]]}
    table = run_all.build_table({"machine": row["machine"], "created": "now", "ppo_smollm2": onednn})
    assert "| PPO episodes/s, full fine-tuning, smollm2-135m, fp32, ours' fp32 linears on oneDNN |" in table
    assert "oneDNN" not in run_all.build_table({"machine": row["machine"], "created": "now", "ppo_smollm2": row})


def test_a_table_rebuild_keeps_the_header_machine_of_the_measured_rows(tmp_path, monkeypatch):
    """--table-only measures nothing: its header must not claim the rebuild host measured the rows."""
    import json

    sys.path.insert(0, str(REPO / "bench"))
    import run_all

    row = json.loads((REPO / "bench" / "results" / "ppo_smollm2.json").read_text())
    measured = {**row["machine"], "cpu_id": "Measuring CPU (family 1, model 2)"}
    (tmp_path / "results.json").write_text(json.dumps({"machine": measured, "created": "then"}))
    (tmp_path / "ppo_smollm2.json").write_text(json.dumps(row))
    monkeypatch.setattr(run_all, "R", tmp_path)
    run_all.main(["--table-only"])
    rebuilt = json.loads((tmp_path / "results.json").read_text())
    assert rebuilt["machine"] == measured and rebuilt["rebuilt_on"]["cpu_id"] != measured["cpu_id"]
    assert (tmp_path / "table.md").read_text().startswith("Machine: Measuring CPU (family 1, model 2),")
