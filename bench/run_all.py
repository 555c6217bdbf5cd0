"""The CPU benchmark suite in one command: results.json + table.md for the README.

    python bench/run_all.py                  # full CPU suite (under 20 min on 2 quiet cores)
    python bench/run_all.py --quick          # smaller settings, a few minutes (smoke test)
    python bench/run_all.py --pipeline       # + stage=all wall time from an empty cache (~15 min more)
    python bench/run_all.py --only ppo generation
    python bench/run_all.py --gpu            # the GPU variant (bench_hardware.py --gpu); needs CUDA
    python bench/run_all.py --table-only     # rebuild table.md/results.json from the JSONs present

Each benchmark runs as its own subprocess (its output in bench/results/<name>.log, its JSON
in bench/results/<name>.json):

    ppo         bench_ppo.py         our PPO vs TRL 1.12 PPOTrainer (own venv), tiny Llama, LoRA + full
    generation  bench_generation.py  batched KV-cached rollouts vs a one-prompt-at-a-time loop (tiny, SmolLM2)
    sft         bench_sft.py         SFT packing vs no packing (SmolLM2-135M + LoRA)
    hardware    bench_hardware.py    fp32 matmul peak, SFT MFU, int8+LoRA memory per billion parameters
    precision   bench_precision.py   bf16 autocast vs fp32: LoRA train step and forward (SmolLM2-135M)
    rm          bench_rm.py          RM training: question-grouped, deduplicated batches vs TRL's RewardTrainer
    pipeline    bench_pipeline.py    python -m stackllama stage=all from an empty cache (--pipeline)

Every speed figure is a ratio to a baseline measured in the same run, the two alternated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

R = common.RESULTS
SUITE = ("ppo", "generation", "sft", "hardware", "precision", "rm", "pipeline")
# bench_ppo.py result files the table shows, with the variant each was run as (for JSONs written before
# bench_ppo.py recorded --ours / --cpu-isa in its settings).
PPO_RESULTS: dict[str, dict] = {
    "ppo": {},
    "ppo_smollm2": {},
    "ppo_smollm2_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
    "ppo_smollm2_bf16": {},
    "ppo_smollm2_bf16_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
    "ppo_smollm2_avx2": {"cpu_isa": "avx2"},
    "ppo_smollm2_avx2_full_offload": {"cpu_isa": "avx2", "ours": ["ppo.offload_ref_reward=true"]},
    # the same rows re-run on another CPU (an AMD EPYC): each JSON names its machine, the table says it
    "ppo_smollm2_epyc": {},
    "ppo_smollm2_epyc_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
    "ppo_smollm2_epyc_bf16_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
    "ppo_smollm2_epyc_avx2_full_offload": {"cpu_isa": "avx2", "ours": ["ppo.offload_ref_reward=true"]},
    # and on an AVX2-only CPU (AMD EPYC, Zen 3: no AVX-512, no bf16), after the weight-major head/decode
    "ppo_smollm2_zen3_lora": {},
    "ppo_smollm2_zen3_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
    # back on the Zen 5 (AVX-512, bf16), with ppo.cpu_matmul=auto putting ours' fp32 linears on oneDNN
    "ppo_smollm2_zen5_onednn": {},
    "ppo_smollm2_zen5_onednn_full_offload": {"ours": ["ppo.offload_ref_reward=true"]},
}


def plan(quick: bool, large: bool = False) -> dict[str, list[list[str]]]:
    """Command lines per benchmark (several for generation), full or quick settings."""
    b = common.BENCH
    py = sys.executable
    hardware = [py, str(b / "bench_hardware.py"), "--memory-steps", "1"] + (["--large"] if large else [])
    if quick:
        return {
            "ppo": [[py, str(b / "bench_ppo.py"), "--steps", "2", "--repeats", "1", "--finetune", "lora", "full"]],
            "generation": [
                [
                    py,
                    str(b / "bench_generation.py"),
                    "--model",
                    "tiny",
                    "--prompts",
                    "16",
                    "--repeats",
                    "2",
                    "--output",
                    str(R / "generation_tiny.json"),
                ],
                [
                    py,
                    str(b / "bench_generation.py"),
                    "--model",
                    "smollm2-135m",
                    "--prompts",
                    "4",
                    "--repeats",
                    "2",
                    "--min-new-tokens",
                    "16",
                    "--max-new-tokens",
                    "17",
                    "--output",
                    str(R / "generation_smollm2-135m.json"),
                ],
            ],
            "sft": [[py, str(b / "bench_sft.py"), "--steps", "2", "--repeats", "1"]],
            "hardware": [hardware],
            "precision": [[py, str(b / "bench_precision.py"), "--repeats", "1"]],
            "rm": [[py, str(b / "bench_rm.py"), "--pairs", "64", "--repeats", "1"]],
            "pipeline": [[py, str(b / "bench_pipeline.py")]],
        }
    return {
        "ppo": [[py, str(b / "bench_ppo.py"), "--steps", "4", "--repeats", "2", "--finetune", "lora", "full"]],
        "generation": [
            [
                py,
                str(b / "bench_generation.py"),
                "--model",
                "tiny",
                "--prompts",
                "16",
                "--repeats",
                "3",
                "--output",
                str(R / "generation_tiny.json"),
            ],
            [
                py,
                str(b / "bench_generation.py"),
                "--model",
                "smollm2-135m",
                "--prompts",
                "8",
                "--repeats",
                "2",
                "--output",
                str(R / "generation_smollm2-135m.json"),
            ],
        ],
        "sft": [[py, str(b / "bench_sft.py"), "--steps", "3", "--repeats", "2"]],
        "hardware": [hardware],
        "precision": [[py, str(b / "bench_precision.py"), "--repeats", "3"]],
        "rm": [[py, str(b / "bench_rm.py"), "--pairs", "192", "--repeats", "2"]],
        "pipeline": [[py, str(b / "bench_pipeline.py")]],
    }


def run_step(name: str, cmds: list[list[str]]) -> dict:
    started = time.perf_counter()
    log_path = R / f"{name}.log"
    ok = True
    with open(log_path, "w") as fh:
        for cmd in cmds:
            common.log(f"{name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}")
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            proc = subprocess.run(cmd, cwd=common.REPO, stdout=fh, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                ok = False
                common.log(f"{name} FAILED (rc={proc.returncode}); see {log_path}")
                break
    seconds = time.perf_counter() - started
    common.log(f"{name}: {'done' if ok else 'failed'} in {seconds:.0f}s")
    return {"ok": ok, "seconds": seconds, "log": str(log_path.relative_to(common.REPO))}


def load(name: str) -> dict | None:
    path = R / name
    return json.loads(path.read_text()) if path.exists() else None


# =============================================================================== table
def fmt(x: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def build_table(results: dict) -> str:
    m = results["machine"]
    lines = [
        f"Machine: {common.describe_cpu(m)}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads), "
        f"torch {m['torch']}, transformers {m['transformers']}, trl {m['trl']} (baseline trl {m['trl_baseline']}), "
        f"commit `{m['git_commit'][:12]}`, {results['created']}"
        + (" (quick mode)" if results.get("quick") else "")
        + (
            " (rebuilt from the JSONs present: each row's settings say how it ran"
            + (f"; rebuilt on {common.describe_cpu(results['rebuilt_on'])}" if results.get("rebuilt_on") else "")
            + ")"
            if results.get("quick") is None
            else ""
        ),
        "",
        "| Benchmark | Ours | Baseline | Ratio (ours / baseline) | Target | Setting |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key in PPO_RESULTS:
        ppo = results.get(key)
        if not ppo:
            continue
        st = ppo["settings"]
        variant = "".join(f", ours: {o}" for o in st.get("ours") or PPO_RESULTS[key].get("ours", [])) + (
            ", AVX2 code paths" if (st.get("cpu_isa") or PPO_RESULTS[key].get("cpu_isa")) == "avx2" else ""
        )
        if any(r.get("cpu_matmul") == "onednn" for r in ppo.get("runs", [])):  # ppo.cpu_matmul as resolved
            variant += ", ours' fp32 linears on oneDNN"
        cpu = common.describe_cpu(ppo.get("machine", {}))
        if ppo.get("machine") and cpu != common.describe_cpu(m):  # measured on another machine than the header's
            variant += f", on {cpu}"
        speed_min = ppo.get("targets", {}).get("speed_ratio_min", 1.5)  # older JSONs: the old targets
        memory_max = ppo.get("targets", {}).get("memory_ratio_max", 0.6)
        precision = "bf16 autocast" if st.get("bf16") else "fp32"
        setting = (
            f"{st['model']}, {precision}, batch {st['batch_size']}, {st['response_length']} tokens, "
            f"{st['ppo_epochs']} epochs x {st['mini_batches']} mini-batches, {st['steps']} steps x {st['repeats']}"
        )
        for ft, s in ppo["summary"].items():
            if not s:
                continue
            o, t = s["ours"], s["trl"]
            label = ("LoRA" if ft == "lora" else "full fine-tuning") + f", {st['model']}, {precision}{variant}"
            lines.append(
                f"| PPO episodes/s, {label} | {o['episodes_per_second']:.3f} | TRL 1.12 PPOTrainer "
                f"{t['episodes_per_second']:.3f} | **{s['speed_ratio']:.2f}x** (per repeat "
                f"{', '.join(f'{x:.2f}' for x in s.get('speed_ratio_per_repeat', []))}) | >= {speed_min}x "
                f"({'met' if s['speed_target_met'] else 'missed'}) | {setting} |"
            )
            lines.append(
                f"| PPO peak RSS, {label} | {o['peak_rss_mb']:.0f} MB | {t['peak_rss_mb']:.0f} MB | "
                f"**{s['memory_ratio']:.2f}x** (above pre-load: {s['memory_ratio_above_preload']:.2f}x) | "
                f"<= {memory_max}x ({'met' if s['memory_target_met'] else 'missed'}) | per process, ru_maxrss |"
            )
            sh, tsh = o["time_split_share"], t["time_split_share"]
            lines.append(
                f"| PPO time split, {label} | rollout {sh['rollout']:.0%}, scoring {sh['score']:.0%}, "
                f"no-grad passes {sh.get('train_forward_no_grad', 0):.0%}, optimisation "
                f"{sh.get('train_optimize', sh['train']):.0%} | TRL: rollout {tsh['rollout']:.0%}, scoring "
                f"{tsh['score']:.0%}, no-grad passes {tsh.get('train_forward_no_grad', 0):.0%}, optimisation "
                f"{tsh.get('train_optimize', tsh['train']):.0%} | | | share of train() wall time |"
            )
    for key, label in (("generation_tiny", "tiny"), ("generation_smollm2-135m", "SmolLM2-135M")):
        g = results.get(key)
        if g:
            s = g["summary"]
            lines.append(
                f"| Rollout tokens/s, {label} | batched {s['batched']['tokens_per_second']:.1f} | one-by-one "
                f"{s['naive']['tokens_per_second']:.1f} | **{s['ratio_tokens_per_second']:.2f}x** (per repeat "
                f"{', '.join(f'{x:.2f}' for x in s.get('ratio_per_repeat', []))}) | | "
                f"{g['prompts']} prompts, {min(g['lengths'])}-{max(g['lengths'])} new tokens, "
                f"LoRA {'on' if g['lora'] else 'off'} |"
            )
    sft = results.get("sft")
    if sft:
        s = sft["summary"]
        lines.append(
            f"| SFT real tokens/s, packing | {s['packed']['tokens_per_second']:.1f} | no packing "
            f"{s['unpacked']['tokens_per_second']:.1f} (padding {s['unpacked']['padding_fraction']:.0%}) | "
            f"**{s['ratio_tokens_per_second']:.2f}x** | | {sft['model']}, LoRA, seq {sft['seq_length']}, "
            f"batch {sft['batch_size']}, {sft['steps']} steps x {sft['repeats']} |"
        )
    hw = results.get("hardware")
    if hw:
        peak = hw["matmul_peak"]
        mfu = hw["sft_mfu"]
        lines.append(
            f"| SFT MFU (6N, packed) | {mfu['packed']['mfu_6n']:.1%} | fp32 matmul peak "
            f"{peak['tflops'] * 1e3:.0f} GFLOP/s | | | {mfu['model']} {mfu['params'] / 1e6:.0f}M params, "
            f"{mfu['packed']['tokens_per_second']:.0f} tokens/s; LoRA does ~4N: "
            f"{mfu['packed']['hfu_4n_lora']:.1%} |"
        )
        for run in hw["memory"]["runs"]:
            lo, hi = hw["memory"]["rule_of_thumb_gb_per_b"]
            lines.append(
                f"| SFT memory per B params, int8 + LoRA, {run['name']} | {run['gb_per_b_params']:.2f} GB | "
                f"article's rule of thumb {lo}-{hi} GB | {run['gb_per_b_params'] / hi:.2f}x of {hi} | | "
                f"peak RSS - pre-load RSS = {run['peak_minus_preload_mb']:.0f} MB (weights alone, malloc_trim-ed: "
                f"{run['gb_per_b_params_weights_only']:.2f} GB/B); anonymous memory only (RSS minus mapped "
                f"files): {fmt(run.get('gb_per_b_params_anon'))} GB/B, weights "
                f"{fmt(run.get('gb_per_b_params_weights_only_anon'))} GB/B; seq {run['seq_length']} x batch "
                f"{run['batch_size']}, CPU |"
            )
    prec = results.get("precision")
    if prec:
        for kind, label in (("train", "LoRA train step (fwd+bwd)"), ("forward", "forward (no grad)")):
            p = prec["summary"][kind]
            lines.append(
                f"| bf16 autocast tokens/s, {label} | {p['bf16_tokens_per_second']:.0f} | fp32 "
                f"{p['fp32_tokens_per_second']:.0f} | **{p['ratio']:.2f}x** (per repeat "
                f"{', '.join(f'{x:.2f}' for x in p['ratio_per_repeat'])}) | | {prec['model']}, batch "
                f"{prec['batch']} x {prec['seq']} tokens, CPU bf16 instructions: "
                f"{'yes' if prec['cpu_has_fast_bf16'] else 'no'} |"
            )
    rm = results.get("rm")
    if rm:
        s = rm["summary"]
        tok = s["tokens_per_epoch"]
        lines.append(
            f"| RM training pairs/s, grouped + deduplicated batches | {s['ours_pairs_per_second']:.2f} | "
            f"TRL RewardTrainer {s['baseline_pairs_per_second']:.2f} | **{s['ratio']:.2f}x** (per repeat "
            f"{', '.join(f'{x:.2f}' for x in s['ratio_per_repeat'])}) | | {rm['model']} + LoRA (rm), "
            f"{rm['pairs']} pairs of {rm['questions']} questions, batch {rm['batch']} pairs, chunks of "
            f"{rm['chunk']}, {rm['mixed_precision']}; tokens forwarded per epoch (padded) "
            f"{tok['ours']['padded']} vs {tok['baseline']['padded']} |"
        )
    pipe = results.get("pipeline")
    if pipe:
        stages = ", ".join(
            f"{k.split('/')[-1].removesuffix('_s')} {v:.0f}s"
            for k, v in pipe["stage_times_s"].items()
            if isinstance(v, (int, float)) and k.startswith("time/stage/") and not k.endswith("_build_s")
        )
        extra = pipe["command"].split("logger=none", 1)[-1].strip()
        head = pipe.get("headline_metrics", {})
        outcome = ""
        if "eval/win_rate_vs_sft" in head:
            outcome = f"; eval win rate vs SFT {head['eval/win_rate_vs_sft']:.3f}" + (
                f" (gold {head['eval/gold_win_rate_vs_sft']:.3f})" if "eval/gold_win_rate_vs_sft" in head else ""
            )
        met = "met" if pipe["wall_s"] < 15 * 60 else "missed"
        lines.append(
            f"| Pipeline wall time, stage=all | {pipe['wall_s'] / 60:.1f} min | | | < 15 min ({met}) | "
            f"{'embedded default' if not extra else 'overrides: ' + extra}, fresh artifacts dir and empty "
            f"cache; {stages}{outcome} |"
        )
    elif results.get("pipeline_skipped"):
        lines.append("| Pipeline wall time, stage=all | not run (use --pipeline) | | | | |")
    gpu = results.get("gpu_check")
    if gpu and not gpu.get("smoke"):
        name = gpu["machine"].get("cuda") or "GPU"
        for step, row in gpu["steps"].items():
            stages = ", ".join(
                f"{k} {v.get('build_seconds', 0):.0f}s / {v.get('memory/peak_cuda_mb', 0):.0f} MB"
                + (f" ({v['gb_per_b_params']:.2f} GB/B params)" if "gb_per_b_params" in v else "")
                for k, v in row.get("stages", {}).items()
            )
            lines.append(f"| GPU check {step} ({name}) | {row['status']}, {row.get('seconds', 0)} s | | | | {stages} |")
    else:
        lines.append("| GPU check (bench/gpu_check.sh) | not yet run: no GPU lent so far | | | | |")
    return "\n".join(lines) + "\n"


def collect(quick: bool, steps: dict) -> dict:
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "quick": quick,
        "machine": {**common.machine_info(), "load_average_at_end": common.load_average()},
        "steps": steps,
    }
    for key, fname in (
        ("ppo", "ppo.json"),
        *((key, f"{key}.json") for key in PPO_RESULTS if key != "ppo"),
        ("gpu_check", "gpu_check.json"),
        ("generation_tiny", "generation_tiny.json"),
        ("generation_smollm2-135m", "generation_smollm2-135m.json"),
        ("sft", "sft.json"),
        ("hardware", "hardware.json"),
        ("precision", "precision.json"),
        ("rm", "rm.json"),
        ("pipeline", "pipeline.json"),
        ("hardware_gpu", "hardware_gpu.json"),
    ):
        data = load(fname)
        if data is not None:
            results[key] = data
    results["pipeline_skipped"] = "pipeline" not in steps and "pipeline" not in results
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller settings (smoke test)")
    p.add_argument("--pipeline", action="store_true", help="also time stage=all from an empty cache (~15 min)")
    p.add_argument("--large", action="store_true", help="memory also on a ~0.5B random Llama (bench_hardware --large)")
    p.add_argument("--only", nargs="+", choices=SUITE, help="run only these benchmarks")
    p.add_argument("--gpu", action="store_true", help="run the GPU variant instead (needs CUDA)")
    p.add_argument("--table-only", action="store_true", help="rebuild results.json/table.md from existing JSONs")
    args = p.parse_args(argv)
    R.mkdir(parents=True, exist_ok=True)

    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("run_all --gpu: no CUDA device visible; the GPU variant only runs on a GPU machine.")
            return
        steps = [
            run_step("hardware_gpu", [[sys.executable, str(common.BENCH / "bench_hardware.py"), "--gpu"]]),
            run_step(  # PPO vs TRL 1.12 on the GPU, bf16 autocast on both sides
                "ppo_gpu",
                [
                    [sys.executable, str(common.BENCH / "bench_ppo.py"), "--device", "cuda", "--bf16"]
                    + ["--model", "smollm2-135m", "--steps", "4", "--batch-size", "16", "--repeats", "2"]
                    + ["--output", str(R / "ppo_gpu.json")]
                ],
            ),
        ]
        for name in ("hardware_gpu", "ppo_gpu"):
            print((R / f"{name}.log").read_text()[-4000:])
        if not all(step["ok"] for step in steps):
            sys.exit(1)
        return

    steps: dict[str, dict] = {}
    if not args.table_only:
        started = time.perf_counter()
        wanted = args.only or [s for s in SUITE if s != "pipeline" or args.pipeline]
        commands = plan(args.quick, args.large)
        if "ppo" in wanted:
            common.ensure_trl_venv()  # once, outside any timing
        for name in SUITE:
            if name in wanted:
                steps[name] = run_step(name, commands[name])
        common.log(f"suite finished in {time.perf_counter() - started:.0f}s")
    previous = load("results.json") if args.table_only else None
    results = collect(None if args.table_only else args.quick, steps)
    if previous is not None:
        # A rebuild measures nothing: the header keeps the machine the suite's rows were measured on,
        # and PPO rows from elsewhere name theirs (build_table). The rebuild's own host is recorded.
        results["rebuilt_on"] = results["machine"]
        results["machine"] = previous["machine"]
    common.write_json(R / "results.json", results)
    table = build_table(results)
    (R / "table.md").write_text(table)
    print(table)
    print(f"wrote {R / 'results.json'} and {R / 'table.md'}")
    if any(not s["ok"] for s in steps.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
