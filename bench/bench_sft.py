"""SFT throughput with and without packing, on the same model, data and settings.

    python bench/bench_sft.py                       # SmolLM2-135M + LoRA, the embedded settings
    python bench/bench_sft.py --model tiny --steps 20
    python bench/bench_sft.py --steps 8 --repeats 3 sft.seq_length=512 quantization=nf4

Each run loads a fresh model (same seed, same LoRA init), builds the stage's own SFTTrainer
(stackllama.stages.sft.make_trainer) and trains ``--steps`` steps without checkpoints. The
two modes alternate (packed, unpacked, packed, ...) so drift in machine load hits both.
Reported per mode: real tokens/s (padding excluded: the useful throughput), token slots/s
(what the model computes, padding included) and the padding fraction of the batches fed,
all measured from the collated batches. Writes bench/results/sft.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results" / "sft.json"
MODES = {"packed": True, "unpacked": False}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="model group option: smollm2-135m (default), tiny, ...")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode, alternating")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. sft.seq_length=512")
    return parser.parse_args()


def compose(model: str, overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from stackllama.config import register_configs
    from stackllama.train import config_dir

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=config_dir()):
        # fp32 unless overridden: the MFU row divides by bench_hardware's fp32 peak
        overrides = [f"model={model}", "logger=none", "mixed_precision=no", *overrides]
        return hydra_compose(config_name="config", overrides=overrides)


def run_once(cfg, packing: bool, steps: int, train_ds, base_path, tokenizer) -> dict:
    """One fresh model, ``steps`` steps of the stage's trainer; the counted throughput."""
    import torch
    from transformers.trainer_utils import SaveStrategy, set_seed

    from stackllama.metrics import Metrics
    from stackllama.stages import sft
    from stackllama.task import RunContext
    from stackllama.tracking import Tracker

    cfg.sft.packing = packing
    cfg.sft.max_steps = steps
    set_seed(int(cfg.seed))
    with tempfile.TemporaryDirectory(prefix="bench_sft_") as tmp:
        ctx = RunContext(Path(tmp), Metrics(Path(tmp) / "metrics.json"), Tracker(), torch.device("cpu"))
        model = sft.load_policy(cfg, ctx, base_path, tokenizer)
        trainer = sft.make_trainer(cfg, ctx, model, tokenizer, train_ds, Path(tmp))
        trainer.args.save_strategy = SaveStrategy.NO  # time training, not checkpoint writes
        started, cpu_started = time.perf_counter(), time.process_time()
        trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    counter = trainer.data_collator
    return {
        "mode": "packed" if packing else "unpacked",
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "real_tokens": counter.real_tokens,
        "token_slots": counter.total_tokens,
        "batches": counter.batches,
        "tokens_per_second": counter.real_tokens / seconds,
        "slots_per_second": counter.total_tokens / seconds,
        # per CPU-second of this process: with OMP_NUM_THREADS=1 it barely moves when other
        # jobs share the cores, so it compares runs on a busy machine
        "tokens_per_cpu_second": counter.real_tokens / cpu_seconds,
        "padding_fraction": counter.padding_fraction,
    }


def summarize(rows: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        out[mode] = {
            key: statistics.mean(r[key] for r in mine)
            for key in (
                "tokens_per_second",
                "tokens_per_cpu_second",
                "slots_per_second",
                "padding_fraction",
                "seconds",
                "real_tokens",
            )
        }
        out[mode]["tokens_per_second_runs"] = [round(r["tokens_per_second"], 1) for r in mine]
    out["ratio_tokens_per_second"] = out["packed"]["tokens_per_second"] / out["unpacked"]["tokens_per_second"]
    out["ratio_tokens_per_cpu_second"] = (
        out["packed"]["tokens_per_cpu_second"] / out["unpacked"]["tokens_per_cpu_second"]
    )
    return out


def print_table(summary: dict, cfg, steps: int, repeats: int) -> None:
    print(
        f"\nSFT packing benchmark: model={cfg.model.name} seq_length={cfg.sft.seq_length} "
        f"batch={cfg.sft.batch_size} steps={steps} repeats={repeats} threads={_threads()}"
    )
    print(f"{'mode':<10}{'real tok/s':>12}{'tok/cpu-s':>11}{'slots/s':>10}{'padding':>10}{'s/run':>8}   runs (tok/s)")
    for mode in MODES:
        s = summary[mode]
        print(
            f"{mode:<10}{s['tokens_per_second']:>12.1f}{s['tokens_per_cpu_second']:>11.1f}"
            f"{s['slots_per_second']:>10.1f}{s['padding_fraction']:>10.3f}{s['seconds']:>8.1f}"
            f"   {s['tokens_per_second_runs']}"
        )
    print(
        f"packed / unpacked real tokens/s: {summary['ratio_tokens_per_second']:.2f}x "
        f"(per CPU-second: {summary['ratio_tokens_per_cpu_second']:.2f}x)"
    )


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    args = parse_args()
    from stackllama.models.loader import load_tokenizer, model_folder
    from stackllama.stages import sft

    cfg = compose(args.model, args.overrides)
    _, train_ds, _ = sft.load_texts(cfg)
    base_path = model_folder(cfg.model)
    tokenizer = load_tokenizer(base_path)

    rows = []
    for repeat in range(args.repeats):
        order = list(MODES.items()) if repeat % 2 == 0 else list(MODES.items())[::-1]
        for mode, packing in order:
            row = run_once(cfg, packing, args.steps, train_ds, base_path, tokenizer)
            row["repeat"] = repeat
            rows.append(row)
            print(
                f"[{mode} #{repeat}] {row['tokens_per_second']:.1f} real tok/s, "
                f"padding {row['padding_fraction']:.3f}, {row['seconds']:.1f}s",
                flush=True,
            )

    summary = summarize(rows)
    print_table(summary, cfg, args.steps, args.repeats)
    payload = {
        "benchmark": "sft_packing",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.model.name,
        "quantization": cfg.quantization.mode,
        "lora": bool(cfg.lora.enabled),
        "seq_length": int(cfg.sft.seq_length),
        "batch_size": int(cfg.sft.batch_size),
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": _threads(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "summary": summary,
        "runs": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
