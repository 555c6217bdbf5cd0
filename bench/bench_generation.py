"""Rollout throughput: our batched, KV-cached ``generate_rollout`` vs one prompt at a time.

    python bench/bench_generation.py                          # tiny Llama, 16 prompts
    python bench/bench_generation.py --model smollm2-135m --prompts 8 --repeats 2
    python bench/bench_generation.py --min-new-tokens 32 --max-new-tokens 33   # fixed 32 tokens

Same model (loaded as the PPO stage loads its policy: ``stackllama.stages.ppo.load_policy``,
LoRA adapters on as in PPO unless ``lora=none`` is passed as an override), same prompts (the
synthetic RL split), same sampling settings (the config's top_k/top_p/temperature) and the
same per-prompt response lengths (drawn once from the PPO length sampler, like the article:
min_new_tokens..max_new_tokens-1).

* batched: ``stackllama.ppo.rollout.generate_rollout`` on all prompts at once (generates up
  to the longest length, masks each response to its own);
* naive: ``model.generate`` per prompt with ``min_new_tokens = max_new_tokens = its length``,
  the article's loop.

Throughput = real response tokens (sum of the lengths) / wall time; the modes alternate
(batched, naive, naive, batched, ...). Writes bench/results/generation.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

RESULTS = common.RESULTS / "generation.json"
MODES = ("batched", "naive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model group option: tiny (default), smollm2-135m, ...")
    p.add_argument("--prompts", type=int, default=16, help="prompts per rollout (the PPO batch size)")
    p.add_argument("--min-new-tokens", type=int, default=16, help="length sampler lower bound (inclusive)")
    p.add_argument("--max-new-tokens", type=int, default=33, help="length sampler upper bound (exclusive)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per mode, alternated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. lora=none")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(common.REPO))
    from stackllama.data import build_dataset
    from stackllama.data.prompts import PromptSource
    from stackllama.models.loader import model_folder
    from stackllama.ppo.core import LengthSampler
    from stackllama.ppo.rollout import generate_rollout
    from stackllama.stages.ppo import load_policy

    cfg = common.compose(
        [
            f"model={args.model}",
            f"ppo.min_new_tokens={args.min_new_tokens}",
            f"ppo.max_new_tokens={args.max_new_tokens}",
            "ppo.stop_at_eos=false",
            *args.overrides,
        ]
    )
    device = torch.device("cpu")
    torch.manual_seed(args.seed)
    policy, tok = load_policy(cfg, model_folder(cfg.model), device)
    model = policy.generation_model()
    splits = build_dataset(cfg.data)
    prompts = PromptSource(
        list(splits.rl["question"]), list(splits.rl["query"]), tok, int(cfg.ppo.max_prompt_length), args.seed
    )
    idx = prompts.next_batch(args.prompts)
    questions = [prompts.questions[i] for i in idx]
    query_ids = [prompts.query_ids[i] for i in idx]
    sampler = LengthSampler(args.min_new_tokens, args.max_new_tokens, seed=args.seed)
    lengths = [sampler() for _ in idx]
    real_tokens = sum(lengths)
    ppo = cfg.ppo

    def batched() -> int:
        ro = generate_rollout(model, tok, questions, query_ids, lengths, ppo, device)
        return int(ro.response_mask.sum())

    @torch.no_grad()
    def naive() -> int:
        model.eval()
        n = 0
        for q, length in zip(query_ids, lengths):
            ids = torch.tensor([q], device=device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=length,
                min_new_tokens=length,
                do_sample=True,
                top_k=int(ppo.top_k),
                top_p=float(ppo.top_p),
                temperature=float(ppo.temperature),
                pad_token_id=tok.pad_token_id,
                use_cache=True,
            )
            n += out.shape[1] - ids.shape[1]
        return n

    fns = {"batched": batched, "naive": naive}
    # warm-up: one short call each (first-call allocations, lazy imports)
    generate_rollout(model, tok, questions[:2], query_ids[:2], [2, 2], ppo, device)
    model.generate(
        input_ids=torch.tensor([query_ids[0]]), max_new_tokens=2, do_sample=True, top_k=0, pad_token_id=tok.pad_token_id
    )
    rows = []
    for repeat in range(args.repeats):
        order = MODES if repeat % 2 == 0 else MODES[::-1]
        for mode in order:
            started = time.perf_counter()
            produced = fns[mode]()
            seconds = time.perf_counter() - started
            rows.append(
                {
                    "mode": mode,
                    "repeat": repeat,
                    "seconds": seconds,
                    "tokens": produced,
                    "tokens_per_second": produced / seconds,
                }
            )
            common.log(f"[{mode} #{repeat}] {produced} tokens in {seconds:.2f}s: {produced / seconds:.1f} tokens/s")
    summary = {}
    for mode in MODES:
        mine = [r for r in rows if r["mode"] == mode]
        summary[mode] = {
            "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in mine),
            "seconds": statistics.mean(r["seconds"] for r in mine),
            "tokens_per_second_runs": [round(r["tokens_per_second"], 1) for r in mine],
        }
    summary["ratio_tokens_per_second"] = summary["batched"]["tokens_per_second"] / summary["naive"]["tokens_per_second"]
    summary["ratio_best"] = max(summary["batched"]["tokens_per_second_runs"]) / max(
        summary["naive"]["tokens_per_second_runs"]
    )
    summary["ratio_per_repeat"] = [
        round(
            next(r for r in rows if r["mode"] == "batched" and r["repeat"] == k)["tokens_per_second"]
            / next(r for r in rows if r["mode"] == "naive" and r["repeat"] == k)["tokens_per_second"],
            3,
        )
        for k in range(args.repeats)
    ]
    slots = args.prompts * max(lengths)
    print(
        f"\nGeneration benchmark: model={cfg.model.name} lora={bool(cfg.lora.enabled)} prompts={args.prompts} "
        f"lengths {min(lengths)}..{max(lengths)} (sum {real_tokens}, batched computes {slots} slots) "
        f"threads={torch.get_num_threads()}"
    )
    print(f"{'mode':<9}{'tokens/s':>10}{'s/rollout':>11}   runs (tokens/s)")
    for mode in MODES:
        s = summary[mode]
        print(f"{mode:<9}{s['tokens_per_second']:>10.1f}{s['seconds']:>11.2f}   {s['tokens_per_second_runs']}")
    print(
        f"batched / naive tokens/s: {summary['ratio_tokens_per_second']:.2f}x (per repeat "
        f"{summary['ratio_per_repeat']}, best / best {summary['ratio_best']:.2f}x)"
    )
    payload = {
        "benchmark": "rollout_generation",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": cfg.model.name,
        "lora": bool(cfg.lora.enabled),
        "prompts": args.prompts,
        "lengths": lengths,
        "real_tokens": real_tokens,
        "batched_token_slots": slots,
        "query_lengths": [len(q) for q in query_ids],
        "repeats": args.repeats,
        "overrides": args.overrides,
        "machine": {**common.machine_info(), "load_average_at_end": common.load_average()},
        "summary": summary,
        "runs": rows,
    }
    common.write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
