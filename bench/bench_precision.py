"""bf16 autocast vs fp32 on this machine: a LoRA training step and a scoring forward (SmolLM2-135M).

    python bench/bench_precision.py                 # 3 timed repeats per mode, alternated
    python bench/bench_precision.py --repeats 5 --batch 16 --seq 96

What ``mixed_precision=bf16`` buys (stackllama/precision.py): the same model and LoRA
adapters (``lora=default``, fp32 weights), the same random token batch, timed as
* train: forward + backward of the LM loss (what SFT, RM and PPO's optimisation do),
* forward: a no-grad forward (what scoring, PPO's no-grad pass and eval do),
once with ``precision.autocast("no")`` and once with ``precision.autocast("bf16")``, the
two alternated, one warm-up pass each first. Tokens/s ratios bf16 / fp32 per repeat and
their median. CPU speed-ups need bf16 instructions (AVX512-BF16 / AMX): reported as
``cpu_has_fast_bf16``.

Writes bench/results/precision.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "precision.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=16, help="sequences per pass (an RM step of 8 pairs)")
    p.add_argument("--seq", type=int, default=96, help="tokens per sequence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from stackllama import precision
    from stackllama.models.loader import load_model, load_tokenizer, model_folder

    cfg = common.compose([f"model={args.model}", "lora=default"])
    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder)
    model = load_model(
        folder, "causal_lm", cfg.quantization, cfg.lora, dtype="float32", device=torch.device("cpu"), tokenizer=tok
    )
    cpu = torch.device("cpu")
    ids = torch.randint(100, 10_000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def train(mode: str) -> None:
        model.train()
        with precision.autocast(mode, cpu):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward(mode: str) -> None:
        model.eval()
        with torch.no_grad(), precision.autocast(mode, cpu):
            model(input_ids=ids)

    tokens = args.batch * args.seq
    rows: dict[str, dict[str, list[float]]] = {k: {"no": [], "bf16": []} for k in ("train", "forward")}
    for kind, fn in (("train", train), ("forward", forward)):
        for mode in ("no", "bf16"):
            fn(mode)  # warm-up (oneDNN picks and caches its kernels)
        for r in range(args.repeats):
            for mode in ("no", "bf16") if r % 2 == 0 else ("bf16", "no"):
                rows[kind][mode].append(tokens / timed(lambda fn=fn, mode=mode: fn(mode)))
        common.log(
            f"{kind}: fp32 {statistics.median(rows[kind]['no']):.0f} tokens/s, "
            f"bf16 {statistics.median(rows[kind]['bf16']):.0f} tokens/s"
        )
    summary = {}
    for kind, by_mode in rows.items():
        ratios = [b / a for a, b in zip(by_mode["no"], by_mode["bf16"])]
        summary[kind] = {
            "fp32_tokens_per_second": statistics.median(by_mode["no"]),
            "bf16_tokens_per_second": statistics.median(by_mode["bf16"]),
            "ratio": statistics.median(ratios),
            "ratio_per_repeat": ratios,
        }
        print(
            f"{kind}: bf16 / fp32 tokens/s = {summary[kind]['ratio']:.2f}x "
            f"(per repeat {', '.join(f'{x:.2f}' for x in ratios)})"
        )
    payload = {
        "benchmark": "precision",
        "model": args.model,
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "lora": "default",
        "cpu_has_fast_bf16": precision.cpu_has_fast_bf16(),
        "machine": common.machine_info(),
        "summary": summary,
    }
    common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
