"""Our PPO loop vs TRL 1.12's ``trl.experimental.ppo.PPOTrainer`` (the last TRL that has one).

    python bench/bench_ppo.py                          # tiny Llama, LoRA and full fine-tuning, 2 repeats
    python bench/bench_ppo.py --steps 4 --repeats 1 --finetune lora
    python bench/bench_ppo.py --model smollm2-135m --steps 3 --finetune lora
    python bench/bench_ppo.py --profile                # + torch.profiler table of one of OUR steps

Both sides get the same base model (the tiny random Llama, or ``--model``), the same reward
model (a 1-label sequence-classification copy of the base, saved once to a temp folder;
TRL's value model is initialised from it too, as TRL's example does), the same prompts
(token ids of the synthetic RL split), batch size, fixed response length (ours:
min_new_tokens = R, max_new_tokens = R + 1, stop_at_eos=false; TRL: response_length = R,
no stop token), PPO epochs, mini-batches, learning rate, KL coefficient (fixed 0.05),
temperature 1, float32, no gradient checkpointing, no checkpoints, no sample generations.

TRL 1.12 runs in its own virtualenv (bench/.venv-trl, created on first use: trl==1.12.0 with
the same torch/transformers as ours). Each run is a separate subprocess, so its peak RSS
(``getrusage(RUSAGE_SELF).ru_maxrss`` at the end) is its own; the RSS after imports and
before any model is loaded is recorded too. Runs alternate ours, TRL, ours, TRL, ...

episodes/s = batch_size * steps / wall time of ``train()`` (model loading, trainer
construction and venv creation excluded). Ratios: ours / TRL for speed and for memory.
Writes bench/results/ppo.json; each worker's output goes to bench/results/ppo_*.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py: no torch/stackllama at import time)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

RESULTS = common.RESULTS / "ppo.json"
SIDES = ("ours", "trl")
TARGET_SPEED = 2.0  # ours/TRL episodes/s at least this (issue 18: at SmolLM2 scale)
TARGET_MEMORY = 0.5  # ours/TRL peak RSS at most this
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}  # conf/lora/default.yaml


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="model group option for the base (tiny, smollm2-135m)")
    p.add_argument("--steps", type=int, default=10, help="PPO steps per run")
    p.add_argument("--batch-size", type=int, default=16, help="episodes per step")
    p.add_argument("--mini-batches", type=int, default=2, help="mini-batches per PPO epoch")
    p.add_argument("--ppo-epochs", type=int, default=4)
    p.add_argument("--response-length", type=int, default=32, help="fixed response length (tokens)")
    p.add_argument("--learning-rate", type=float, default=1.41e-5)
    p.add_argument("--kl-coef", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=2, help="runs per side and setting, alternated")
    p.add_argument("--finetune", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides run")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="both sides under bf16 autocast (ours: mixed_precision=bf16, TRL: bf16=True); fp32 weights either way",
    )
    p.add_argument(
        "--cpu-isa",
        default="native",
        choices=["native", *common.CPU_ISA_ENV],
        help="cap the instruction set both sides' kernels use (avx2: an AVX2-only CPU's code paths)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ours",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra overrides for our side, e.g. ppo.head_chunk_size=8 (memory/speed trade-offs)",
    )
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES, help="run only some sides (profiling)")
    p.add_argument("--profile", action="store_true", help="also profile one of our steps (torch.profiler)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--output", type=Path, default=RESULTS)
    # internal: one side's run inside its own process
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# =============================================================================== setup
def prepare(args: argparse.Namespace, workdir: Path) -> dict:
    """Base model folder, the shared reward-model folder and the prompts; the spec both sides read."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from stackllama.data import build_dataset
    from stackllama.models.loader import load_tokenizer, model_folder

    cfg = common.compose([f"model={args.model}"])
    base = model_folder(cfg.model)
    tok = load_tokenizer(base, padding_side="left")
    reward_dir = workdir / "reward_model"
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # the score head is freshly initialised: seed it
        rm = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1, dtype=torch.float32)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(reward_dir)
    tok.save_pretrained(reward_dir)
    del rm

    splits = build_dataset(cfg.data)
    questions, queries = list(splits.rl["question"]), list(splits.rl["query"])
    query_ids = [tok(q, add_special_tokens=False)["input_ids"] for q in queries]
    return {
        "model": args.model,
        "base_model": str(base),
        "reward_model": str(reward_dir),
        "template": str(cfg.data.prompt_template),
        "questions": questions,
        "queries": queries,
        "query_ids": query_ids,
        "batch_size": args.batch_size,
        "mini_batches": args.mini_batches,
        "ppo_epochs": args.ppo_epochs,
        "response_length": args.response_length,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "kl_coef": args.kl_coef,
        "seed": args.seed,
        "lora": LORA,
        "ours_overrides": list(args.ours),
        "precision": "bf16" if args.bf16 else "no",
        "device": args.device,
    }


# =============================================================================== workers
def worker_ours(spec: dict, finetune: str, profile: bool) -> dict:
    if finetune == "lora":
        # LoRA needs peft, imported before the pre-load reading as trl imports it on the other side.
        # Our full fine-tuning never imports peft, nor bitsandbytes, which peft imports whenever it
        # is installed (46-52 MB of RSS on the machines measured; TRL's venv has no bitsandbytes):
        # importing it here charged our full-fine-tuning rows memory the stage does not use
        # (tests/test_ppo.py::test_full_fine_tuning_imports_neither_peft_nor_bitsandbytes).
        import peft  # noqa: F401
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    from stackllama.data.prompts import PromptSource
    from stackllama.ppo import trainer as our_trainer
    from stackllama.ppo.trainer import PPOTrainer
    from stackllama.reward import RewardScorer
    from stackllama.stages.ppo import cpu_linears, load_policy, offload_frozen

    rss_preload = common.rss_now_mb()
    sampler = common.RssSampler()
    our_trainer.generate_rollout = sampler.wrap(our_trainer.generate_rollout, lambda *a, **k: "rollout")
    B, R = spec["batch_size"], spec["response_length"]
    overrides = [
        f"model={spec['model']}",
        "lora=default" if finetune == "lora" else "lora=none",
        f"ppo.total_episodes={B * spec['steps']}",
        f"ppo.batch_size={B}",
        f"ppo.mini_batch_size={B // spec['mini_batches']}",
        f"ppo.ppo_epochs={spec['ppo_epochs']}",
        f"ppo.min_new_tokens={R}",
        f"ppo.max_new_tokens={R + 1}",
        "ppo.stop_at_eos=false",
        "ppo.top_k=0",
        "ppo.top_p=1.0",
        "ppo.temperature=1.0",
        f"ppo.learning_rate={spec['learning_rate']}",
        f"ppo.kl_coef={spec['kl_coef']}",
        "ppo.sample_every=0",
        "ppo.save_every=0",
        f"ppo.reward_batch_size={B}",
        "ppo.max_prompt_length=1024",
        f"mixed_precision={spec.get('precision', 'no')}",  # as TRL's side (--bf16: both bf16 autocast)
        *spec.get("ours_overrides", []),
    ]
    cfg = common.compose(overrides)
    device = torch.device(spec.get("device", "cpu"))
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    policy, tok = load_policy(cfg, Path(spec["base_model"]), device)
    scorer = RewardScorer.from_pretrained(
        spec["reward_model"],
        device=device,
        batch_size=B,
        template=spec["template"],
        mixed_precision=cfg.mixed_precision,
    )
    params = sum(p.numel() for p in policy.parameters()) + sum(p.numel() for p in scorer.model.parameters())
    prompts = PromptSource(spec["questions"], spec["queries"], tok, 1024, spec["seed"])
    with tempfile.TemporaryDirectory(prefix="bench_ppo_ours_") as tmp:
        cpu_matmul = cpu_linears(cfg, policy, scorer, cfg.mixed_precision, device)  # as the stage
        score, _ = offload_frozen(cfg, policy, scorer, Path(tmp) / "offload")  # as the stage (ppo.offload_ref_reward)
        trainer = PPOTrainer(
            cfg.ppo,
            policy,
            tok,
            sampler.wrap(score, lambda *a, **k: "score"),
            prompts,
            device,
            spec["seed"],
            Path(tmp) / "ckpt",
            mixed_precision=cfg.mixed_precision,
        )
        trainer._forward_no_grad = sampler.wrap(trainer._forward_no_grad, lambda *a, **k: "forward")
        trainer._optimize = sampler.wrap(trainer._optimize, lambda *a, **k: "optimize")
        setup_s = time.perf_counter() - t0
        rss_loaded = common.rss_now_mb()
        with sampler:
            started = time.perf_counter()
            history = trainer.train()
            train_s = time.perf_counter() - started
        profile_table = profile_step(trainer) if profile else None
    keys = ("rollout", "score", "forward", "optimize", "step")
    split = {k: sum(h[f"time/ppo/{k}"] for h in history) for k in keys}
    out = {
        "setup_s": setup_s,
        "train_s": train_s,
        "episodes": B * len(history),
        "rss_preload_mb": rss_preload,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "time_split_s": {
            "rollout": split["rollout"],
            "score": split["score"],
            "train": split["forward"] + split["optimize"],  # no-grad policy/ref/value forward + PPO epochs
            "train_forward_no_grad": split["forward"],
            "train_optimize": split["optimize"],
            "other": max(train_s - split["rollout"] - split["score"] - split["forward"] - split["optimize"], 0.0),
        },
        "rss_peak_by_phase_mb": sampler.peaks,
        "rss_peak_by_phase_first_step_mb": sampler.first_cycle,
        "response_len_mean": statistics.mean(h["tokens/response_len_mean"] for h in history),
        "reward_mean_last": history[-1]["env/reward_mean"],
        "params": params,
        "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
        "cpu_matmul": cpu_matmul,  # ppo.cpu_matmul as resolved: onednn | mkl (none: not on CPU)
    }
    if profile_table is not None:
        out["profile"] = profile_table
    return out


def profile_step(trainer) -> dict:
    """One more of our steps under torch.profiler: the top operators and each phase's share."""
    from torch.profiler import ProfilerActivity, profile, record_function

    trainer.cfg.total_episodes = (trainer.step_idx + 1) * trainer.cfg.batch_size
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        with record_function("ppo_step"):
            stats = trainer.step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    top = [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1e3,
            "cpu_total_ms": e.cpu_time_total / 1e3,
            "calls": e.count,
        }
        for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:25]
    ]
    return {
        "step_s": stats["time/ppo/step"],
        "phases_s": {k: stats[f"time/ppo/{k}"] for k in ("rollout", "score", "forward", "optimize")},
        "top_ops": top,
    }


def worker_trl(spec: dict, finetune: str) -> dict:
    """TRL 1.12's experimental PPOTrainer, configured to do the same work as ours."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    rss_preload = common.rss_now_mb()
    sampler = common.RssSampler()
    # Time TRL's phases by wrapping its module-level helpers (a few microseconds per call).
    phase = {"rollout": 0.0, "score": 0.0, "value": 0.0, "ref_forward": 0.0}
    holder: dict = {}

    def timed(fn, name_of):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                name = name_of(*a, **kw)
                if name:
                    phase[name] += time.perf_counter() - t

        return wrapper

    trl_ppo.batch_generation = sampler.wrap(
        timed(trl_ppo.batch_generation, lambda *a, **k: "rollout"), lambda *a, **k: "rollout"
    )
    trl_ppo.get_reward = sampler.wrap(
        timed(trl_ppo.get_reward, lambda m, *a, **k: "score" if m is holder.get("reward") else "value"),
        lambda m, *a, **k: "score" if m is holder.get("reward") else "forward",
    )
    trl_ppo.forward = sampler.wrap(
        timed(trl_ppo.forward, lambda *a, **k: None if torch.is_grad_enabled() else "ref_forward"),
        lambda *a, **k: "optimize" if torch.is_grad_enabled() else "forward",
    )

    B, R = spec["batch_size"], spec["response_length"]
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["base_model"], padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32)
    ref = None
    if finetune == "full":
        ref = AutoModelForCausalLM.from_pretrained(spec["base_model"], dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    holder["reward"] = reward
    peft_config = None
    if finetune == "lora":
        from peft import LoraConfig

        lora = spec["lora"]
        peft_config = LoraConfig(
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]),
            bias="none",
            task_type="CAUSAL_LM",
        )
    train_ds = Dataset.from_dict({"input_ids": spec["query_ids"]})
    eval_ds = Dataset.from_dict({"input_ids": spec["query_ids"][:B]})
    with tempfile.TemporaryDirectory(prefix="bench_ppo_trl_") as tmp:
        args = PPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=B,
            gradient_accumulation_steps=1,
            num_mini_batches=spec["mini_batches"],
            num_ppo_epochs=spec["ppo_epochs"],
            response_length=R,
            total_episodes=B * spec["steps"],
            local_rollout_forward_batch_size=B,
            learning_rate=spec["learning_rate"],
            lr_scheduler_type="constant",
            kl_coef=spec["kl_coef"],
            temperature=1.0,
            stop_token=None,
            missing_eos_penalty=None,
            num_sample_generations=0,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            bf16=spec.get("precision") == "bf16",
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=spec.get("device", "cpu") == "cpu",
            seed=spec["seed"],
            disable_tqdm=False,
        )
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=train_ds,
            value_model=value,
            eval_dataset=eval_ds,
            peft_config=peft_config,
        )
        setup_s = time.perf_counter() - t0
        rss_loaded = common.rss_now_mb()
        with sampler:
            started = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - started
        steps = trainer.state.global_step
        logged = [h for h in trainer.state.log_history if "objective/scores" in h]
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    models = [trainer.model, trainer.reward_model] + ([trainer.ref_model] if trainer.ref_model is not None else [])
    return {
        "setup_s": setup_s,
        "train_s": train_s,
        "episodes": B * steps,
        "rss_preload_mb": rss_preload,
        "rss_loaded_mb": rss_loaded,
        "peak_rss_mb": common.peak_rss_mb(),
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "time_split_s": {
            "rollout": phase["rollout"],
            "score": phase["score"],
            "train": train_s - phase["rollout"] - phase["score"],  # value/ref forward + PPO epochs + bookkeeping
            "train_forward_no_grad": phase["value"] + phase["ref_forward"],
            "train_optimize": train_s - sum(phase.values()),
        },
        "rss_peak_by_phase_mb": sampler.peaks,
        "rss_peak_by_phase_first_step_mb": sampler.first_cycle,
        "reward_mean_last": logged[-1]["objective/scores"] if logged else None,
        "params": sum(p.numel() for m in models for p in m.parameters()),
        "trainable_params": sum(p.numel() for p in trainable),
        "trl_version": trl.__version__,
    }


def run_worker(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec.read_text())
    finetune = spec["finetune"]
    if args.worker == "ours":
        sys.path.insert(0, str(common.REPO))
        out = worker_ours(spec, finetune, bool(spec.get("profile")))
    else:
        out = worker_trl(spec, finetune)
    out.update(
        {"side": args.worker, "finetune": finetune, "python": sys.executable, "cpu_capability": common.cpu_capability()}
    )
    common.write_json(args.result, out)


# =============================================================================== driver
def launch(side: str, spec_path: Path, result_path: Path, log_path: Path, timeout: float) -> dict:
    python = sys.executable if side == "ours" else str(common.trl_python())
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--worker",
        side,
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
    ]
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "disabled",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("VIRTUAL_ENV", None)
    started = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.run(cmd, cwd=common.REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{side} worker failed (rc={proc.returncode}); see {log_path}:\n{tail}")
    out = json.loads(result_path.read_text())
    out["process_wall_s"] = time.perf_counter() - started
    out["episodes_per_second"] = out["episodes"] / out["train_s"]
    out["peak_minus_preload_mb"] = out["peak_rss_mb"] - out["rss_preload_mb"]
    return out


def summarize(rows: list[dict], finetune: str) -> dict:
    out: dict = {}
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side and r["finetune"] == finetune]
        if not mine:
            return {}
        s = {
            k: statistics.mean(r[k] for r in mine)
            for k in (
                "episodes_per_second",
                "train_s",
                "setup_s",
                "peak_rss_mb",
                "rss_preload_mb",
                "rss_loaded_mb",
                "peak_minus_preload_mb",
            )
        }
        s["episodes_per_second_runs"] = [round(r["episodes_per_second"], 3) for r in mine]
        s["peak_rss_mb_runs"] = [round(r["peak_rss_mb"], 1) for r in mine]
        split = {k: statistics.mean(r["time_split_s"][k] for r in mine) for k in mine[0]["time_split_s"]}
        s["time_split_s"] = split
        s["time_split_share"] = {k: v / s["train_s"] for k, v in split.items()}
        seen = {k for r in mine for k in r.get("rss_peak_by_phase_mb", {})}
        phases = [k for k in ("setup", "rollout", "score", "forward", "optimize") if k in seen]
        s["rss_peak_by_phase_mb"] = {k: max(r["rss_peak_by_phase_mb"].get(k, 0.0) for r in mine) for k in phases}
        s["rss_peak_by_phase_first_step_mb"] = {
            k: max(r.get("rss_peak_by_phase_first_step_mb", {}).get(k, 0.0) for r in mine) for k in phases
        }
        s["params"] = mine[0]["params"]
        s["trainable_params"] = mine[0]["trainable_params"]
        out[side] = s
    o, t = out["ours"], out["trl"]
    # Robustness on a busy machine: each repeat's adjacent (ours, TRL) pair as its own ratio,
    # and the ratio of the best runs (least disturbed by other load).
    pairs = [
        (a["episodes_per_second"] / b["episodes_per_second"], a["peak_rss_mb"] / b["peak_rss_mb"])
        for a in rows
        for b in rows
        if a["side"] == "ours"
        and b["side"] == "trl"
        and a["finetune"] == b["finetune"] == finetune
        and a["repeat"] == b["repeat"]
    ]
    out["speed_ratio_per_repeat"] = [round(x, 3) for x, _ in pairs]
    out["memory_ratio_per_repeat"] = [round(y, 3) for _, y in pairs]
    out["speed_ratio_best"] = max(o["episodes_per_second_runs"]) / max(t["episodes_per_second_runs"])
    out["speed_ratio"] = o["episodes_per_second"] / t["episodes_per_second"]
    out["memory_ratio"] = o["peak_rss_mb"] / t["peak_rss_mb"]
    out["memory_ratio_above_preload"] = o["peak_minus_preload_mb"] / t["peak_minus_preload_mb"]
    out["speed_target_met"] = out["speed_ratio"] >= TARGET_SPEED
    out["memory_target_met"] = out["memory_ratio"] <= TARGET_MEMORY
    return out


def print_summary(summary: dict, args: argparse.Namespace) -> None:
    print(
        f"\nPPO benchmark: model={args.model} batch={args.batch_size} response_length={args.response_length} "
        f"mini_batches={args.mini_batches} ppo_epochs={args.ppo_epochs} steps={args.steps} repeats={args.repeats}"
    )
    head = (
        f"{'setting':<6}{'side':<6}{'episodes/s':>11}{'peak RSS MB':>12}{'pre-load MB':>12}{'peak-pre MB':>12}"
        f"{'rollout':>9}{'score':>7}{'train':>7}   runs (ep/s)"
    )
    print(head)
    for finetune in args.finetune:
        s = summary.get(finetune)
        if not s:
            continue
        for side in SIDES:
            x = s[side]
            sh = x["time_split_share"]
            print(
                f"{finetune:<6}{side:<6}{x['episodes_per_second']:>11.3f}{x['peak_rss_mb']:>12.0f}"
                f"{x['rss_preload_mb']:>12.0f}{x['peak_minus_preload_mb']:>12.0f}"
                f"{sh['rollout']:>9.0%}{sh['score']:>7.0%}{sh['train']:>7.0%}   {x['episodes_per_second_runs']}"
            )
        for side in SIDES:
            first = s[side]["rss_peak_by_phase_first_step_mb"]
            peaks = ", ".join(
                f"{k} {first.get(k, 0):.0f}/{v:.0f}" for k, v in s[side]["rss_peak_by_phase_mb"].items() if k != "setup"
            )
            print(f"{finetune:<6}{side:<6}RSS MB by phase, first step/all steps: {peaks}")
        print(
            f"{finetune:<6}ours/TRL: speed {s['speed_ratio']:.2f}x (target >= {TARGET_SPEED}x: "
            f"{'met' if s['speed_target_met'] else 'MISSED'}), peak RSS {s['memory_ratio']:.2f}x (target <= "
            f"{TARGET_MEMORY}x: {'met' if s['memory_target_met'] else 'MISSED'}), "
            f"above pre-load {s['memory_ratio_above_preload']:.2f}x"
        )
        print(
            f"{finetune:<6}speed ratio per repeat {s['speed_ratio_per_repeat']}, best run / best run "
            f"{s['speed_ratio_best']:.2f}x"
        )


def run(args: argparse.Namespace) -> dict:
    """The whole comparison; returns (and writes) the payload."""
    if "trl" in args.sides:
        common.ensure_trl_venv()
    machine = common.machine_info()
    logs = common.RESULTS
    logs.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        tmp = Path(tmp)
        common.log("preparing the base model, the reward model and the prompts")
        base_spec = prepare(args, tmp)
        for finetune in args.finetune:
            for repeat in range(args.repeats):
                for side in [x for x in SIDES if x in args.sides]:  # ABAB: ours, TRL, ours, TRL, ...
                    spec = {
                        **base_spec,
                        "finetune": finetune,
                        "profile": bool(args.profile and side == "ours" and repeat == 0),
                    }
                    spec_path = tmp / f"spec_{finetune}_{side}_{repeat}.json"
                    spec_path.write_text(json.dumps(spec))
                    log_path = logs / f"ppo_{finetune}_{side}_{repeat}.log"
                    row = launch(
                        side, spec_path, tmp / f"result_{finetune}_{side}_{repeat}.json", log_path, args.timeout
                    )
                    row["repeat"] = repeat
                    rows.append(row)
                    common.log(
                        f"[{finetune} {side} #{repeat}] {row['episodes_per_second']:.3f} episodes/s, "
                        f"train {row['train_s']:.1f}s, peak RSS {row['peak_rss_mb']:.0f} MB "
                        f"(pre-load {row['rss_preload_mb']:.0f} MB)"
                    )
    summary = {finetune: summarize(rows, finetune) for finetune in args.finetune}
    if len(args.sides) == len(SIDES):
        print_summary(summary, args)
    payload = {
        "benchmark": "ppo_vs_trl_1.12",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": {
            k: getattr(args, k)
            for k in (
                "model",
                "steps",
                "batch_size",
                "mini_batches",
                "ppo_epochs",
                "response_length",
                "learning_rate",
                "kl_coef",
                "repeats",
                "finetune",
                "bf16",
                "device",
                "ours",
                "cpu_isa",
            )
        },
        "notes": [
            "episodes/s = batch_size * steps / wall time of train() only (no model loading, no venv creation)",
            "peak RSS = getrusage(RUSAGE_SELF).ru_maxrss of each worker process at its end; pre-load = VmRSS after imports",  # noqa: E501
            "TRL with LoRA: the policy gets the adapters (peft_config) and the reference is the policy with adapters off, "  # noqa: E501
            "as ours; TRL's value model is a separate full sequence-classification model that trains all its weights "
            "(its design), ours is a value head on the policy backbone",
            "TRL full fine-tuning: separate frozen reference copy, as ours without LoRA",
            "TRL phases are timed by wrapping trl.experimental.ppo.ppo_trainer.batch_generation/get_reward/forward",
            "machine load during the run: see machine.load_average_at_start/end",
        ],
        "targets": {"speed_ratio_min": TARGET_SPEED, "memory_ratio_max": TARGET_MEMORY},
        "machine": {**machine, "load_average_at_end": common.load_average()},
        "summary": summary,
        "runs": rows,
    }
    common.write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    common.limit_cpu_isa(args.cpu_isa)  # before torch: the workers inherit the environment
    sys.path.insert(0, str(common.REPO))
    run(args)


if __name__ == "__main__":
    main()
