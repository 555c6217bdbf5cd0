"""Against the hardware: matmul peak, SFT model-FLOPs utilisation, memory per billion parameters.

    python bench/bench_hardware.py                  # CPU: fp32 matmul peak, SFT MFU, int8+LoRA memory (SmolLM2)
    python bench/bench_hardware.py --large          # + memory on a larger random Llama (~0.5B, LlamaConfig)
    python bench/bench_hardware.py --sft-json bench/results/sft.json
    python bench/bench_hardware.py --gpu            # CUDA only: bf16 peak; SFT with bf16 / int8 / NF4 bases on
                                                    # SmolLM2 and a 1B-class LlamaConfig: tokens/s, MFU, memory/B

* Peak: ``torch.matmul`` of square matrices at the training dtype (float32 on CPU, bfloat16
  on GPU), best of a few timed repetitions per size: the machine's achievable dense peak,
  not a datasheet figure.
* SFT MFU = 6 * params * tokens/s / peak, with tokens/s from bench/bench_sft.py's JSON
  (packed mode: real tokens, no padding). 6 * params counts the forward (2N) and the
  backward for activations (2N) and weights (2N); with LoRA on a frozen base the weight
  gradients of the base are skipped, so 4 * params is what the hardware actually does:
  both are reported (``mfu_6n``, ``hfu_4n_lora``). Attention FLOPs are left out.
* Memory per billion parameters for SFT with an int8 base + LoRA (the article's setting;
  rule of thumb 1.2-1.4 GB per billion parameters): on CPU, peak RSS minus the process's
  RSS just before the model is loaded (after imports, data and tokenizer); on GPU,
  ``torch.cuda.max_memory_allocated``. Each measurement is its own subprocess.

Writes bench/results/hardware.json (and bench/results/hardware_gpu.json with --gpu).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

RESULTS = common.RESULTS / "hardware.json"
RESULTS_GPU = common.RESULTS / "hardware_gpu.json"
RULE_OF_THUMB_GB_PER_B = (1.2, 1.4)

# Random Llamas built from a LlamaConfig through the tiny-model builder (model=tiny with
# its shape overridden; SmolLM2 tokenizer, vocabulary 49152). Params include embeddings.
SHAPES = {
    # ~0.45B: for CPU memory-per-parameter checks
    "llama-0.5b": {
        "hidden_size": 1536,
        "intermediate_size": 4096,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
    # ~1.1B: TinyLlama-1.1B's shape, for the GPU variant
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "max_position_embeddings": 2048,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--sft-json",
        type=Path,
        default=common.RESULTS / "sft.json",
        help="bench_sft.py output to take SFT tokens/s from (run it when missing, see --run-sft)",
    )
    p.add_argument("--run-sft", action="store_true", help="run bench/bench_sft.py first (--sft-steps/--sft-repeats)")
    p.add_argument("--sft-steps", type=int, default=4)
    p.add_argument("--sft-repeats", type=int, default=1)
    p.add_argument("--memory-model", default="smollm2-135m", help="model for the int8+LoRA memory figure")
    p.add_argument("--memory-steps", type=int, default=1, help="SFT steps in each memory run")
    p.add_argument("--memory-seq-length", type=int, default=256)
    p.add_argument("--memory-batch-size", type=int, default=2)
    p.add_argument("--large", action="store_true", help="also measure a ~0.5B random Llama (slow on CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the memory runs")
    p.add_argument("--gpu", action="store_true", help="the GPU variant (needs CUDA; refuses to run without)")
    p.add_argument("--gpu-steps", type=int, default=12)
    p.add_argument("--gpu-seq-length", type=int, default=1024)
    p.add_argument("--gpu-batch-size", type=int, default=8)
    p.add_argument("--gpu-models", nargs="+", default=["smollm2-135m", "llama-1b"])
    p.add_argument("--gpu-bases", nargs="+", default=["bf16", "int8", "nf4"], choices=["bf16", "int8", "nf4"])
    p.add_argument("--output", type=Path, default=None)
    # internal
    p.add_argument("--sft-worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gpu-dry-run-on-cpu", action="store_true", help=argparse.SUPPRESS)  # smoke-test the GPU code path
    return p.parse_args(argv)


# =============================================================================== peak
def matmul_peak(device: str, dtype_name: str, sizes: list[int], seconds_per_size: float = 1.5) -> dict:
    """Best achieved TFLOP/s of ``a @ b`` (n x n) over sizes and repetitions."""
    import torch

    dtype = getattr(torch, dtype_name)
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        torch.matmul(a, b)  # warm-up
        sync()
        best, runs, spent = 0.0, 0, 0.0
        while spent < seconds_per_size or runs < 3:
            started = time.perf_counter()
            reps = 1 if dev.type == "cpu" else 10
            for _ in range(reps):
                torch.matmul(a, b)
            sync()
            dt = time.perf_counter() - started
            spent += dt
            runs += 1
            best = max(best, reps * 2 * n**3 / dt / 1e12)
        per_size[n] = best
        del a, b
    peak = max(per_size.values())
    common.log(
        f"matmul peak {device} {dtype_name}: {peak:.3f} TFLOP/s "
        f"({', '.join(f'n={n}: {v:.3f}' for n, v in per_size.items())})"
    )
    return {
        "device": device,
        "dtype": dtype_name,
        "threads": torch.get_num_threads(),
        "tflops": peak,
        "tflops_by_size": per_size,
    }


# =============================================================================== params
def model_overrides(name: str) -> list[str]:
    """Hydra overrides selecting a model group option or one of SHAPES (a random Llama)."""
    if name in SHAPES:
        return ["model=tiny", f"model.name={name}"] + [f"model.tiny.{k}={v}" for k, v in SHAPES[name].items()]
    return [f"model={name}"]


def count_params(folder: Path) -> int:
    """Parameters of the model in ``folder`` from its config (meta device: nothing allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


# =============================================================================== SFT worker
def sft_worker(spec: dict) -> dict:
    """One SFT run in this process: tokens/s and memory (RSS on CPU, allocator on CUDA)."""
    import torch
    import trl  # noqa: F401  (imported before the pre-load reading)
    from transformers import TrainerCallback
    from transformers.trainer_utils import SaveStrategy, set_seed

    sys.path.insert(0, str(common.REPO))
    from stackllama.metrics import Metrics
    from stackllama.models.loader import load_tokenizer, model_folder
    from stackllama.stages import sft
    from stackllama.task import RunContext
    from stackllama.tracking import Tracker

    device = torch.device(spec["device"])
    cfg = common.compose(spec["overrides"])
    base_path = model_folder(cfg.model)
    params = count_params(base_path)
    _, train_ds, _ = sft.load_texts(cfg)
    tokenizer = load_tokenizer(base_path)
    rss_preload = common.rss_now_mb()
    anon_preload = common.rss_breakdown_mb().get("RssAnon", 0.0)
    anon = common.RssSampler(interval=0.02, track_anon=True).__enter__()  # peak RssAnon (excludes mapped files)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    set_seed(int(cfg.seed))
    with tempfile.TemporaryDirectory(prefix="bench_hw_sft_") as tmp:
        ctx = RunContext(Path(tmp), Metrics(Path(tmp) / "metrics.json"), Tracker(), device)
        model = sft.load_policy(cfg, ctx, base_path, tokenizer)
        rss_loaded = common.rss_now_mb()
        rss_loaded_trimmed = common.malloc_trim_rss()  # what the weights hold once load-time buffers are returned
        loaded_breakdown = common.rss_breakdown_mb()
        cuda_loaded = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        trainer = sft.make_trainer(cfg, ctx, model, tokenizer, train_ds, Path(tmp))
        trainer.args.save_strategy = SaveStrategy.NO
        counter = trainer.data_collator
        marks: list[tuple[float, int]] = []

        class Mark(TrainerCallback):  # (time, real tokens) after each step: steady-state rate
            def on_step_end(self, args, state, control, **kw):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                marks.append((time.perf_counter(), counter.real_tokens))

        trainer.add_callback(Mark())
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    anon.__exit__(None, None, None)
    out = {
        "model": cfg.model.name,
        "quantization": cfg.quantization.mode,
        "dtype": cfg.model.dtype,
        "lora": bool(cfg.lora.enabled),
        "device": str(device),
        "params": params,
        "seq_length": int(cfg.sft.seq_length),
        "batch_size": int(cfg.sft.batch_size),
        "steps": len(marks),
        "seconds": seconds,
        "real_tokens": counter.real_tokens,
        "tokens_per_second": counter.real_tokens / seconds,
        "rss_preload_mb": rss_preload,
        "rss_loaded_mb": rss_loaded,
        "rss_loaded_trimmed_mb": rss_loaded_trimmed,
        "peak_rss_mb": common.peak_rss_mb(),
    }
    if len(marks) >= 3:  # exclude the first step (allocations, kernel selection)
        (t1, n1), (t2, n2) = marks[0], marks[-1]
        out["tokens_per_second_steady"] = (n2 - n1) / (t2 - t1)
    out["peak_minus_preload_mb"] = out["peak_rss_mb"] - rss_preload
    # RSS also counts file pages still mapped (the loader can keep the safetensors file mapped):
    # the anonymous part is what the process itself allocated.
    out["rss_loaded_breakdown_mb"] = loaded_breakdown
    out["anon_preload_mb"] = anon_preload
    out["anon_peak_mb"] = anon.peak_anon
    out["anon_peak_minus_preload_mb"] = anon.peak_anon - anon_preload
    out["gb_per_b_params_anon"] = (anon.peak_anon - anon_preload) * 2**20 / 1e9 / (params / 1e9)
    out["gb_per_b_params_weights_only_anon"] = (
        (loaded_breakdown.get("RssAnon", 0.0) - anon_preload) * 2**20 / 1e9 / (params / 1e9)
    )
    if device.type == "cuda":
        out["cuda_weights_mb"] = cuda_loaded / 2**20
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
        out["gb_per_b_params"] = torch.cuda.max_memory_allocated(device) / 1e9 / (params / 1e9)
        out["gb_per_b_params_weights_only"] = cuda_loaded / 1e9 / (params / 1e9)
    else:
        out["gb_per_b_params"] = out["peak_minus_preload_mb"] * 2**20 / 1e9 / (params / 1e9)
        out["gb_per_b_params_weights_only"] = (rss_loaded_trimmed - rss_preload) * 2**20 / 1e9 / (params / 1e9)
    return out


def launch_sft(overrides: list[str], device: str, timeout: float = 3600, name: str | None = None) -> dict:
    """``sft_worker`` in a fresh subprocess (its own peak RSS / CUDA allocator)."""
    with tempfile.TemporaryDirectory(prefix="bench_hw_") as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"overrides": overrides, "device": device}))
        tag = "_".join(
            ([name] if name else [])
            + [
                o.split("=")[-1]
                for o in overrides
                if o.startswith(("quantization=",) if name else ("model=", "quantization="))
            ]
        )
        log_path = common.RESULTS / f"hardware_sft_{tag}_{device.split(':')[0]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--sft-worker", str(spec), "--result", str(result)]
        with open(log_path, "w") as fh:
            proc = subprocess.run(
                cmd,
                cwd=common.REPO,
                stdout=fh,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if proc.returncode != 0:
            raise RuntimeError(
                f"SFT worker failed (rc={proc.returncode}), see {log_path}:\n{log_path.read_text()[-3000:]}"
            )
        return json.loads(result.read_text())


# =============================================================================== CPU suite
def sft_mfu(peak_tflops: float, sft_json: Path) -> dict:
    """MFU of the packed SFT run recorded by bench_sft.py."""
    data = json.loads(sft_json.read_text())
    sys.path.insert(0, str(common.REPO))
    from stackllama.models.loader import model_folder

    cfg = (
        common.compose([f"model={data['model']}"])
        if data.get("model") in ("tiny", "smollm2-135m", "llama-7b")
        else common.compose(["model=smollm2-135m"])
    )
    params = count_params(model_folder(cfg.model))
    out = {
        "source": str(sft_json.relative_to(common.REPO) if sft_json.is_relative_to(common.REPO) else sft_json),
        "model": data.get("model"),
        "quantization": data.get("quantization"),
        "lora": data.get("lora"),
        "seq_length": data.get("seq_length"),
        "params": params,
        "peak_tflops": peak_tflops,
    }
    for mode in ("packed", "unpacked"):
        s = data["summary"][mode]
        # real tokens (padding excluded) for the model FLOPs; slots (what is computed) for hardware FLOPs
        flops = 6 * params * s["tokens_per_second"]
        out[mode] = {
            "tokens_per_second": s["tokens_per_second"],
            "slots_per_second": s["slots_per_second"],
            "model_tflops": flops / 1e12,
            "mfu_6n": flops / 1e12 / peak_tflops,
            "hfu_4n_lora": 4 * params * s["slots_per_second"] / 1e12 / peak_tflops,
        }
    out["packing_ratio"] = data["summary"].get("ratio_tokens_per_second")
    common.log(
        f"SFT MFU ({out['model']}, packed): {out['packed']['mfu_6n']:.1%} of {peak_tflops:.3f} TFLOP/s "
        f"({out['packed']['tokens_per_second']:.1f} tokens/s)"
    )
    return out


def run_sft_bench(steps: int, repeats: int, output: Path) -> None:
    cmd = [
        sys.executable,
        str(common.BENCH / "bench_sft.py"),
        "--steps",
        str(steps),
        "--repeats",
        str(repeats),
        "--output",
        str(output),
    ]
    common.log("running " + " ".join(cmd[1:]))
    log_path = common.RESULTS / "sft.log"
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, cwd=common.REPO, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_sft.py failed, see {log_path}:\n{log_path.read_text()[-3000:]}")
    text = log_path.read_text()
    print(text[text.find("SFT packing benchmark") :] if "SFT packing benchmark" in text else text[-1500:])


def memory_runs(args: argparse.Namespace) -> list[dict]:
    models = [args.memory_model] + (["llama-0.5b"] if args.large else [])
    rows = []
    for name in models:
        big = name in SHAPES
        overrides = model_overrides(name) + [
            "quantization=int8",
            "lora=default",
            f"sft.max_steps={args.memory_steps}",
            "sft.packing=true",
            f"sft.seq_length={128 if big else args.memory_seq_length}",
            f"sft.batch_size={1 if big else args.memory_batch_size}",
            "sft.logging_steps=1",
        ]
        common.log(f"memory run: {name} int8 + LoRA ({args.memory_steps} steps)")
        row = launch_sft(overrides, "cpu", name=name)
        row["name"] = name
        rows.append(row)
        common.log(
            f"  {name}: {row['params'] / 1e6:.0f}M params, peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"pre-load {row['rss_preload_mb']:.0f} MB -> {row['gb_per_b_params']:.2f} GB per B params "
            f"(weights alone {row['gb_per_b_params_weights_only']:.2f}); anonymous memory only (no mapped "
            f"files): {row['gb_per_b_params_anon']:.2f} (weights alone {row['gb_per_b_params_weights_only_anon']:.2f})"
        )
    return rows


def run_cpu(args: argparse.Namespace) -> dict:
    peak = matmul_peak("cpu", "float32", [1024, 2048])
    if args.run_sft or not args.sft_json.exists():
        run_sft_bench(args.sft_steps, args.sft_repeats, args.sft_json)
    mfu = sft_mfu(peak["tflops"], args.sft_json)
    memory = [] if args.no_memory else memory_runs(args)
    print("\nHardware benchmark (CPU)")
    print(f"fp32 matmul peak: {peak['tflops'] * 1e3:.1f} GFLOP/s ({peak['threads']} threads)")
    for mode in ("packed", "unpacked"):
        m = mfu[mode]
        print(
            f"SFT {mode:<8} {mfu['model']} {m['tokens_per_second']:.1f} tokens/s -> MFU (6N) {m['mfu_6n']:.1%}, "
            f"HFU (4N, LoRA, slots) {m['hfu_4n_lora']:.1%}"
        )
    for row in memory:
        print(
            f"SFT int8+LoRA memory {row['name']}: {row['gb_per_b_params']:.2f} GB per B params "
            f"(peak RSS - pre-load RSS = {row['peak_minus_preload_mb']:.0f} MB for {row['params'] / 1e6:.0f}M params; "
            f"rule of thumb {RULE_OF_THUMB_GB_PER_B[0]}-{RULE_OF_THUMB_GB_PER_B[1]}); anonymous memory only: "
            f"{row['gb_per_b_params_anon']:.2f}, weights alone {row['gb_per_b_params_weights_only_anon']:.2f}"
        )
    payload = {
        "benchmark": "hardware_cpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {**common.machine_info(), "load_average_at_end": common.load_average()},
        "matmul_peak": peak,
        "sft_mfu": mfu,
        "memory": {
            "rule_of_thumb_gb_per_b": RULE_OF_THUMB_GB_PER_B,
            "measure": "peak RSS (getrusage ru_maxrss) minus RSS before the model is loaded, per subprocess",
            "runs": memory,
        },
    }
    out = args.output or RESULTS
    common.write_json(out, payload)
    print(f"wrote {out}")
    return payload


# =============================================================================== GPU suite
def run_gpu(args: argparse.Namespace) -> dict | None:
    import torch

    dry = args.gpu_dry_run_on_cpu
    if not torch.cuda.is_available() and not dry:
        print("bench_hardware --gpu: no CUDA device visible; the GPU variant does not run on CPU.")
        return None
    device = "cpu" if dry else "cuda"
    peak = matmul_peak(device, "float32" if dry else "bfloat16", [512] if dry else [4096, 8192])
    peak_fp32 = None
    if not dry:
        torch.backends.cuda.matmul.allow_tf32 = False
        peak_fp32 = matmul_peak("cuda", "float32", [4096])
    bases = {  # the training dtype is bf16 on GPU; quantized bases compute in bf16
        "bf16": ["quantization=none", "model.dtype=bfloat16"],
        "int8": ["quantization=int8", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16"],
        "nf4": ["quantization=nf4", "model.dtype=bfloat16", "quantization.compute_dtype=bfloat16"],
    }
    if dry:  # CPU smoke test of this code path: float32 everywhere, tiny settings
        bases = {k: [o for o in v if "bfloat16" not in o] for k, v in bases.items()}
    rows = []
    for name in args.gpu_models:
        for base in args.gpu_bases:
            overrides = (
                model_overrides(name)
                + bases[base]
                + [
                    "lora=default",
                    f"sft.max_steps={args.gpu_steps}",
                    "sft.packing=true",
                    f"sft.seq_length={args.gpu_seq_length}",
                    f"sft.batch_size={args.gpu_batch_size}",
                    "sft.logging_steps=1",
                ]
            )
            common.log(f"GPU SFT run: {name} base={base}")
            try:
                row = launch_sft(overrides, device, name=name)
            except Exception as exc:  # keep the other configurations
                common.log(f"  failed: {str(exc)[-500:]}")
                rows.append({"name": name, "base": base, "error": str(exc)[-2000:]})
                continue
            tps = row.get("tokens_per_second_steady", row["tokens_per_second"])
            row.update(
                {
                    "name": name,
                    "base": base,
                    "tokens_per_second_used": tps,
                    "mfu_6n": 6 * row["params"] * tps / 1e12 / peak["tflops"],
                    "hfu_4n_lora": 4 * row["params"] * tps / 1e12 / peak["tflops"],
                }
            )
            rows.append(row)
            common.log(f"  {tps:.0f} tokens/s, MFU {row['mfu_6n']:.1%}, {row['gb_per_b_params']:.2f} GB per B params")
    print("\nHardware benchmark (GPU)" + (" [dry run on CPU]" if dry else ""))
    print(
        f"{peak['dtype']} matmul peak: {peak['tflops']:.1f} TFLOP/s"
        + (f"; fp32 (no TF32): {peak_fp32['tflops']:.1f}" if peak_fp32 else "")
    )
    print(f"{'model':<14}{'base':<6}{'params':>8}{'tokens/s':>10}{'MFU 6N':>8}{'GB/B params':>12}{'weights GB/B':>13}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<14}{r['base']:<6}  failed: {r['error'][-120:]!r}")
            continue
        print(
            f"{r['name']:<14}{r['base']:<6}{r['params'] / 1e6:>7.0f}M{r['tokens_per_second_used']:>10.0f}"
            f"{r['mfu_6n']:>8.1%}{r['gb_per_b_params']:>12.2f}{r['gb_per_b_params_weights_only']:>13.2f}"
        )
    payload = {
        "benchmark": "hardware_gpu",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "dry_run_on_cpu": dry,
        "machine": common.machine_info(),
        "matmul_peak": peak,
        "matmul_peak_fp32": peak_fp32,
        "memory_rule_of_thumb_gb_per_b": RULE_OF_THUMB_GB_PER_B,
        "notes": [
            "tokens/s excludes the first step when >= 3 steps ran (tokens_per_second_steady)",
            "memory = torch.cuda.max_memory_allocated over load + training, per subprocess",
        ],
        "runs": rows,
    }
    out = args.output or RESULTS_GPU
    common.write_json(out, payload)
    print(f"wrote {out}")
    return payload


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.sft_worker:
        spec = json.loads(args.sft_worker.read_text())
        common.write_json(args.result, sft_worker(spec))
        return
    if args.gpu or args.gpu_dry_run_on_cpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
