"""Reward-model training speed: question-grouped, deduplicated batches vs TRL's RewardTrainer as is.

    python bench/bench_rm.py                      # 192 pairs, batches of 16 pairs, 2 repeats
    python bench/bench_rm.py --pairs 320 --repeats 3 --mixed-precision no

Both sides train the same SmolLM2-135M + ``lora=rm`` sequence classifier (fresh copy per
run) for one epoch on the same pairs of the synthetic ``reward`` split (whole questions,
as ``rm.group_by_question`` selects them), ``rm.batch_size`` pairs a step:

* baseline: ``trl.RewardTrainer`` with its own sampler and ``DataCollatorForPreference``
  (every pair's chosen and rejected text forwarded, random batches);
* ours: ``stackllama.reward.batches`` (a question's pairs in one batch, each distinct
  text forwarded once, length-sorted chunks of ``--chunk`` texts).

Reported: pairs/s (training wall time of ``trainer.train()``), the ratio ours / baseline
per repeat (runs alternated) and their median, and the forwarded and padded token counts
per epoch (what makes the difference). The loss is the same function of the same pairs
(tests/test_rm.py checks logits and gradients against TRL's collator).

Writes bench/results/rm.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

RESULTS = common.RESULTS / "rm.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--pairs", type=int, default=192, help="training pairs (one epoch)")
    p.add_argument("--batch", type=int, default=16, help="pairs per step (rm.batch_size)")
    p.add_argument("--chunk", type=int, default=4, help="rm.forward_chunk_size for our side")
    p.add_argument("--mixed-precision", default="bf16", choices=("no", "bf16"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--output", type=Path, default=RESULTS)
    return p.parse_args(argv)


def token_counts(cols: dict, batches: list[list[int]], dedup: bool, chunk: int | None) -> tuple[int, int]:
    """(real, padded) tokens forwarded per epoch for these batches."""
    from stackllama.reward.batches import dedup_pairs, length_chunks

    real = padded = 0
    for b in batches:
        chosen = [cols["chosen_ids"][i] for i in b]
        rejected = [cols["rejected_ids"][i] for i in b]
        seqs = dedup_pairs(chosen, rejected)[0] if dedup else chosen + rejected
        lengths = [len(s) for s in seqs]
        for rows in length_chunks(lengths, chunk if dedup else None):
            real += sum(lengths[r] for r in rows)
            padded += max(lengths[r] for r in rows) * len(rows)
    return real, padded


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import datasets
    import torch
    from trl import RewardTrainer

    from stackllama import precision
    from stackllama.data import build_dataset
    from stackllama.models.loader import load_model, load_tokenizer, model_folder
    from stackllama.reward.batches import DedupPreferenceCollator, GroupedPairSampler, grouped_reward_trainer
    from stackllama.stages.rm import encode_train_pairs, pair_groups, reward_config

    cfg = common.compose(
        [
            f"model={args.model}",
            f"mixed_precision={args.mixed_precision}",
            f"rm.batch_size={args.batch}",
            f"rm.forward_chunk_size={args.chunk}",
            "rm.logging_steps=1000",
            "rm.learning_rate=2e-3",
        ]
    )
    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder, padding_side="right")
    splits = build_dataset(cfg.data)
    cols, _, _ = encode_train_pairs(
        splits.reward,
        tok,
        cfg.data.prompt_template,
        int(cfg.rm.max_length),
        args.pairs,
        int(cfg.seed),
        group_by_question=True,
    )
    groups, group_lengths = pair_groups(cols, True)
    train_set = datasets.Dataset.from_dict({k: cols[k] for k in ("chosen_ids", "rejected_ids")})
    cpu = torch.device("cpu")

    stream = list(GroupedPairSampler(groups, group_lengths, args.batch, int(cfg.seed)))
    ours_batches = [stream[i : i + args.batch] for i in range(0, len(stream), args.batch)]
    order = list(range(len(stream)))
    random.Random(0).shuffle(order)
    trl_batches = [order[i : i + args.batch] for i in range(0, len(order), args.batch)]
    counts = {
        "baseline": token_counts(cols, trl_batches, False, None),
        "ours": token_counts(cols, ours_batches, True, args.chunk),
    }

    def run(side: str) -> float:
        model = load_model(folder, "seq_cls", cfg.quantization, cfg.rm.lora, dtype="float32", device=cpu, tokenizer=tok)
        with tempfile.TemporaryDirectory() as tmp:
            rc = reward_config(cfg, type("Ctx", (), {"device": cpu})(), Path(tmp), len(train_set))
            if side == "baseline":
                trainer = RewardTrainer(model=model, args=rc, train_dataset=train_set, processing_class=tok)
            else:
                cls = grouped_reward_trainer(groups, group_lengths, args.chunk)
                trainer = cls(
                    model=model,
                    args=rc,
                    train_dataset=train_set,
                    processing_class=tok,
                    data_collator=DedupPreferenceCollator(tok.pad_token_id),
                )
            started = time.perf_counter()
            trainer.train()
            wall = time.perf_counter() - started
        common.log(f"{side}: {len(train_set)} pairs in {wall:.1f} s ({len(train_set) / wall:.2f} pairs/s)")
        return len(train_set) / wall

    rates: dict[str, list[float]] = {"baseline": [], "ours": []}
    for r in range(args.repeats):
        for side in ("baseline", "ours") if r % 2 == 0 else ("ours", "baseline"):
            rates[side].append(run(side))
    ratios = [o / b for o, b in zip(rates["ours"], rates["baseline"])]
    summary = {
        "baseline_pairs_per_second": statistics.median(rates["baseline"]),
        "ours_pairs_per_second": statistics.median(rates["ours"]),
        "ratio": statistics.median(ratios),
        "ratio_per_repeat": ratios,
        "tokens_per_epoch": {
            side: {"real": real, "padded": padded, "padding_fraction": 1 - real / padded}
            for side, (real, padded) in counts.items()
        },
    }
    print(
        f"rm training pairs/s: ours {summary['ours_pairs_per_second']:.2f} vs TRL RewardTrainer "
        f"{summary['baseline_pairs_per_second']:.2f} = {summary['ratio']:.2f}x (per repeat "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); padded tokens per epoch {counts['ours'][1]} vs "
        f"{counts['baseline'][1]}"
    )
    payload = {
        "benchmark": "rm",
        "model": args.model,
        "pairs": len(train_set),
        "questions": len(groups),
        "batch": args.batch,
        "chunk": args.chunk,
        "mixed_precision": args.mixed_precision,
        "repeats": args.repeats,
        "lora": "rm",
        "cpu_has_fast_bf16": precision.cpu_has_fast_bf16(),
        "machine": common.machine_info(),
        "summary": summary,
    }
    common.write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
