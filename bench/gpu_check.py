"""The GPU check: the pipeline, the quantized PPO paths and the benchmarks on one CUDA device, every figure in one JSON.

    bash bench/gpu_check.sh                 # on a GPU machine (installs from the working tree first)
    python bench/gpu_check.py --smoke       # the same steps on CPU with tiny settings (tests/test_bench.py)

Steps (each its own subprocess with a time limit; a failed step is recorded and the rest go on):

  environment   torch / CUDA / package versions, the device name
  stage_all     ``python -m stackllama stage=all`` with the embedded default on the device (bf16 via
                mixed_precision=auto), into a fresh artifact store: wall time, each stage's build time and
                peak memory (the artifacts' manifests), the eval win rates
  ppo_int8      ``stage=ppo quantization=int8`` on that store (SFT and RM reused, PPO rebuilt)
  ppo_nf4       ``stage=ppo quantization=nf4``, likewise
  bench_gpu     ``bench/run_all.py --gpu`` (bf16 matmul peak, SFT MFU per base, PPO vs TRL 1.12 on CUDA)
  memory_1b     int8 + LoRA SFT and PPO on a randomly initialised ~1.1B Llama (TinyLlama's shape, built from
                a LlamaConfig offline): peak CUDA memory per billion parameters against the article's
                1.2-1.4 GB rule of thumb

``--smoke`` runs every step on CPU with the tiny Llama and a handful of steps, so the plumbing is
tested where there is no GPU; its figures mean nothing (bench_gpu is skipped without CUDA).
Writes bench/results/gpu_check.json (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "gpu_check.json"
RULE_OF_THUMB_GB_PER_B = (1.2, 1.4)  # the article: int8 + LoRA needs ~1.2-1.4 GB per billion parameters
LLAMA_1B = {  # TinyLlama-1.1B's shape (bench_hardware.SHAPES["llama-1b"])
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}
# Small enough for a CPU smoke run of every step (tests/test_bench.py)
SMOKE = [
    "model=tiny",
    "data.synthetic.num_questions=40",
    "sft.max_steps=2",
    "sft.seq_length=64",
    "sft.eval_size=4",
    "sft.num_sample_generations=0",
    "rm.max_length=96",
    "rm.max_steps=2",
    "rm.max_eval_pairs=4",
    "ppo.total_episodes=4",
    "ppo.batch_size=2",
    "ppo.mini_batch_size=2",
    "ppo.min_new_tokens=4",
    "ppo.max_new_tokens=6",
    "eval.num_questions=2",
    "eval.max_new_tokens=6",
    "eval.batch_size=2",
    "eval.best_of_n=[]",
]
SMOKE_SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny Llama, a few steps: test the plumbing")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--step-timeout", type=float, default=420, help="seconds per step before it is stopped")
    p.add_argument("--ppo-episodes", type=int, default=64, help="episodes of the quantized PPO runs")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    return p.parse_args(argv)


def run_cli(overrides: list[str], run_dir: Path, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """``python -m stackllama <overrides>`` into ``run_dir``: status, seconds, its metrics.json."""
    cmd = [sys.executable, "-m", "stackllama", *overrides, f"hydra.run.dir={run_dir}"]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.perf_counter() - started, 1), "command": " ".join(cmd)}
    seconds = round(time.perf_counter() - started, 1)
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    metrics_path = run_dir / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    ok = proc.returncode == 0 and metrics.get("run/status") == "completed"
    out = {"status": "ok" if ok else "failed", "seconds": seconds, "command": " ".join(cmd[2:])}
    if not ok:
        out["error"] = (proc.stderr or proc.stdout)[-1500:]
    out["metrics"] = metrics
    return out


def stage_figures(metrics: dict[str, Any], memory_kind: str) -> dict[str, Any]:
    """Each built stage's build time, peak memory and GB per billion parameters, from its manifest."""
    out: dict[str, Any] = {}
    folders = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("upstream/") and k.endswith("/path")}
    if "artifact/path" in metrics:  # the run's own stage (stage=ppo: its PPO artifact)
        folders[str(metrics.get("run/stage", "ppo"))] = metrics["artifact/path"]
    for stage, path in folders.items():
        manifest_path = Path(path) / "manifest.json"
        if not manifest_path.exists():
            continue
        manifest = json.loads(manifest_path.read_text())
        memory = manifest.get("memory", {})
        params = metrics.get(f"{stage}/params/total") or manifest.get("metrics", {}).get("params/total")
        peak = memory.get(f"memory/peak_{memory_kind}_mb")  # cuda or rss
        row = {"build_seconds": manifest.get("build_seconds"), "params": params, **memory}
        if peak and params:
            row["gb_per_b_params"] = round(peak / 1024 / (params / 1e9), 3)
        out[stage] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    device = "cuda" if cuda else "cpu"
    mem_kind = "cuda" if cuda else "rss"
    smoke = SMOKE if args.smoke else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.update({"WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    wanted = set(args.only or ["stage_all", "ppo_int8", "ppo_nf4", "bench_gpu", "memory_1b"])
    report: dict[str, Any] = {
        "benchmark": "gpu_check",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "smoke": bool(args.smoke),
        "device": device,
        "machine": common.machine_info(),
        "rule_of_thumb_gb_per_b": RULE_OF_THUMB_GB_PER_B,
        "memory_measure": "torch.cuda.max_memory_allocated per build" if cuda else "peak RSS per build (not a figure)",
        "steps": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        tmp = Path(tmp)
        store = tmp / "artifacts"
        base = ["logger=none", f"device={device}", f"artifacts_dir={store}", *smoke]

        def record(name: str, row: dict[str, Any]) -> None:
            metrics = row.pop("metrics", {})
            row["stages"] = stage_figures(metrics, mem_kind)
            keep = ("eval/win_rate", "eval/gold_win_rate", "objective/kl", "ppo/steps", "run/")
            row["figures"] = {k: v for k, v in metrics.items() if k.startswith(keep) and not isinstance(v, str)}
            report["steps"][name] = row
            common.log(f"{name}: {row['status']} in {row['seconds']}s")
            common.write_json(args.output, report)  # every step lands at once: a stopped run keeps the rest

        if "stage_all" in wanted:
            record("stage_all", run_cli(["stage=all", *base], tmp / "stage_all", args.step_timeout, env))
        for quant in ("int8", "nf4"):
            if f"ppo_{quant}" in wanted:
                overrides = ["stage=ppo", *base, f"quantization={quant}"]
                if not args.smoke:
                    overrides.append(f"ppo.total_episodes={args.ppo_episodes}")
                record(f"ppo_{quant}", run_cli(overrides, tmp / f"ppo_{quant}", args.step_timeout, env))
        if "bench_gpu" in wanted:
            if not cuda:
                report["steps"]["bench_gpu"] = {"status": "skipped", "reason": "no CUDA device (or --smoke)"}
            else:
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, str(common.BENCH / "run_all.py"), "--gpu"],
                    cwd=common.REPO,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=args.step_timeout,
                )
                row: dict[str, Any] = {"status": "ok" if proc.returncode == 0 else "failed"}
                row["seconds"] = round(time.perf_counter() - t0, 1)
                for name in ("hardware_gpu.json", "ppo_gpu.json"):
                    path = common.RESULTS / name
                    if path.exists():
                        row[name.removesuffix(".json")] = json.loads(path.read_text())
                if proc.returncode != 0:
                    row["error"] = (proc.stderr or proc.stdout)[-1500:]
                report["steps"]["bench_gpu"] = row
            common.write_json(args.output, report)
        if "memory_1b" in wanted:
            shape = SMOKE_SHAPE if args.smoke else LLAMA_1B
            overrides = [
                "stage=ppo",
                *base,
                "model=tiny",
                "model.name=llama-1b-random",
                *[f"model.tiny.{k}={v}" for k, v in shape.items()],
                "quantization=int8",
                "lora=default",
                f"artifacts_dir={tmp / 'artifacts_1b'}",
            ]
            if not args.smoke:  # a few steps of each: memory, not learning
                overrides += ["sft.max_steps=4", "rm.max_steps=4", "ppo.total_episodes=32", "sft.seq_length=512"]
            record("memory_1b", run_cli(overrides, tmp / "memory_1b", args.step_timeout, env))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    common.write_json(args.output, report)
    print(json.dumps({k: v.get("status") for k, v in report["steps"].items()}))
    print(f"wrote {args.output} ({report['total_seconds']}s)")
    return report


if __name__ == "__main__":
    main()
