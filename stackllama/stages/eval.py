"""Stage 'eval': the PPO policy against its SFT reference on held-out questions.

``python -m stackllama stage=eval`` finds (or builds) the SFT, RM and PPO artifacts for
this config, then on ``eval.num_questions`` unique questions of the ``evaluation`` split
(no PPO, RM or SFT training ever saw them):

1. samples one response per question from the PPO policy and one from the SFT model with
   PPO's sampling settings (``ppo.temperature``, ``ppo.top_k``, ``ppo.top_p``,
   ``ppo.stop_at_eos``; at most ``eval.max_new_tokens``), batched and left-padded, ``torch``
   reseeded before every batch of either model so both draw the same random stream
   (identical models give identical responses);
2. KL of the policy to the reference on the PPO responses: per response, the sum over its
   tokens of the ``ppo.kl_estimator`` estimate from ``log p_ppo(y_t)`` and ``log p_sft(y_t)``
   (log-probs of softmax(logits / temperature), as in training), averaged over responses:
   the sequence KL that PPO's ``objective/kl`` reports during training;
3. scores every response with the reward model (the proxy PPO optimized) and, on
   synthetic data, with the hidden gold scorer (the truth the proxy stands in for).

Only one model is in memory at a time (policy, then reference, then reward model).
Figures go to ``metrics.json`` (``eval/...``), every response to ``eval_samples.jsonl``,
and ``report.md`` (``stackllama.stages.eval_report``) puts them beside the PPO run's curves.
The sweep objective is ``eval/win_rate_vs_sft`` (RM-judged, ties count half).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import torch

from stackllama import precision
from stackllama.data.prompts import eval_questions
from stackllama.ppo.core import kl_estimate, logprobs_from_hidden, repetition_stats
from stackllama.ppo.policy import response_hidden
from stackllama.ppo.rollout import generate_rollout

log = logging.getLogger(__name__)

OBJECTIVE = "eval/win_rate_vs_sft"


# --------------------------------------------------------------------------------------
# Questions
# --------------------------------------------------------------------------------------


def encode_queries(
    questions: Sequence[str], template: str, tokenizer: Any, max_prompt_length: int, n: int
) -> tuple[list[str], list[list[int]], int]:
    """Prompts (template, empty answer) of up to ``n`` questions that fit ``max_prompt_length``."""
    from stackllama.data import format_prompt

    kept_q: list[str] = []
    kept_ids: list[list[int]] = []
    skipped = 0
    for q in eval_questions(questions, len(questions)):
        if len(kept_q) >= n:
            break
        ids = tokenizer(format_prompt(template, q), add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            skipped += 1
            continue
        kept_q.append(q)
        kept_ids.append(list(ids))
    return kept_q, kept_ids, skipped


# --------------------------------------------------------------------------------------
# Generation and log-probs
# --------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One generated batch, on CPU. Shapes: b rows, Q padded query, R response tokens."""

    input_ids: torch.Tensor  # (b, Q+R) [left-padded query | right-padded response]
    attention_mask: torch.Tensor  # (b, Q+R)
    response_ids: torch.Tensor  # (b, R)
    response_mask: torch.Tensor  # (b, R)
    query_len: int
    responses: list[str]

    def token_lists(self) -> list[list[int]]:
        return [r[m.bool()].tolist() for r, m in zip(self.response_ids, self.response_mask)]


def batch_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + 7919 * int(index) + 17) % (2**63 - 1)


def sampling_settings(cfg: Any) -> SimpleNamespace:
    """PPO's own sampling (``ppo.temperature``, ``ppo.top_k``, ``ppo.top_p``, ``ppo.stop_at_eos``):
    the policy is judged on the distribution it was trained to sample from."""
    p = cfg.ppo
    return SimpleNamespace(
        top_k=int(p.top_k), top_p=float(p.top_p), temperature=float(p.temperature), stop_at_eos=bool(p.stop_at_eos)
    )


@torch.no_grad()
def sample(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    query_ids: Sequence[Sequence[int]],
    max_new_tokens: int,
    batch_size: int,
    sampling: Any,
    seed: int,
    device: torch.device,
) -> list[Batch]:
    """Responses to every query, ``batch_size`` at a time, torch reseeded before each batch."""
    out: list[Batch] = []
    for b, start in enumerate(range(0, len(query_ids), batch_size)):
        qs = list(questions[start : start + batch_size])
        ids = [list(x) for x in query_ids[start : start + batch_size]]
        torch.manual_seed(batch_seed(seed, b))  # same stream for policy and reference
        ro = generate_rollout(model, tokenizer, qs, ids, [int(max_new_tokens)] * len(ids), sampling, device)
        out.append(
            Batch(
                ro.input_ids.cpu(),
                ro.attention_mask.cpu(),
                ro.response_ids.cpu(),
                ro.response_mask.cpu(),
                ro.query_len,
                list(ro.responses),
            )
        )
    return out


@torch.no_grad()
def response_logprobs(
    model: Any, batches: Sequence[Batch], device: torch.device, temperature: float = 1.0
) -> list[torch.Tensor]:
    """Per batch, (b, R) ``log p(y_t | x, y_<t)`` of each response token under ``model``, 0 where masked.

    The same path as PPO (``response_hidden`` + ``core.logprobs_from_hidden``, logits / T), so
    the KL reported here is the one training controlled.
    """
    head = model.get_output_embeddings()
    out = []
    for bt in batches:
        hidden = response_hidden(model, bt.input_ids.to(device), bt.attention_mask.to(device), bt.query_len)
        lp, _ = logprobs_from_hidden(
            hidden, head, bt.response_ids.to(device), chunk=len(hidden), temperature=temperature
        )
        lp = lp.float().cpu()  # (b, R)
        out.append(torch.where(bt.response_mask.bool(), lp, torch.zeros_like(lp)))
    return out


def sequence_kl(
    logp: Sequence[torch.Tensor], ref_logp: Sequence[torch.Tensor], batches: Sequence[Batch], estimator: str
) -> list[float]:
    """Per response: sum over its tokens of the per-token KL estimate (``ppo.kl_estimator``)."""
    out: list[float] = []
    for lp, ref, bt in zip(logp, ref_logp, batches):
        kl = kl_estimate(lp, ref, estimator)  # (b, R)
        out.extend(torch.where(bt.response_mask.bool(), kl, torch.zeros_like(kl)).sum(1).tolist())
    return out


def load_lm(path: Path, cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """A frozen causal LM (quantized as configured) and its left-padding tokenizer."""
    from stackllama.models.loader import load_model, load_tokenizer

    tok = load_tokenizer(path, padding_side="left")
    model = load_model(path, "causal_lm", cfg.quantization, None, cfg.model.dtype, device, tok, trainable=False)
    return model, tok


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------


def win_rate(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs where ``a`` beats ``b``; ties count half."""
    if len(a) == 0:
        return float("nan")
    a_t, b_t = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float(((a_t > b_t).double() + 0.5 * (a_t == b_t).double()).mean())


def _mean(x: Sequence[float]) -> float:
    return float(torch.as_tensor(x, dtype=torch.float64).mean()) if len(x) else float("nan")


def _std(x: Sequence[float]) -> float:
    return float(torch.as_tensor(x, dtype=torch.float64).std()) if len(x) > 1 else 0.0


def _corr(x: Sequence[float], y: Sequence[float]) -> float:
    if len(x) < 2:
        return float("nan")
    xy = torch.stack([torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)])
    if float(xy.std(1).min()) == 0.0:
        return float("nan")
    return float(torch.corrcoef(xy)[0, 1])


def summarize(
    ppo_tokens: list[list[int]],
    ppo_texts: list[str],
    sft_tokens: list[list[int]],
    sft_texts: list[str],
    reward_ppo: Sequence[float],
    reward_sft: Sequence[float],
    kl: Sequence[float],
    gold_ppo: Sequence[float] | None = None,
    gold_sft: Sequence[float] | None = None,
) -> dict[str, float]:
    """The ``eval/...`` figures from per-question responses, rewards, KLs (and gold scores)."""
    n = len(ppo_texts)
    wr = win_rate(reward_ppo, reward_sft)
    len_ppo = [len(t) for t in ppo_tokens]
    len_sft = [len(t) for t in sft_tokens]
    out: dict[str, float] = {
        "eval/num_questions": n,
        OBJECTIVE: wr,
        "eval/win_rate_stderr": math.sqrt(wr * (1 - wr) / n) if n else float("nan"),
        "eval/tie_rate": _mean([float(a == b) for a, b in zip(reward_ppo, reward_sft)]),
        "eval/reward_mean_ppo": _mean(reward_ppo),
        "eval/reward_mean_sft": _mean(reward_sft),
        "eval/reward_std_ppo": _std(reward_ppo),
        "eval/reward_std_sft": _std(reward_sft),
        "eval/reward_margin_mean": _mean([a - b for a, b in zip(reward_ppo, reward_sft)]),
        "eval/kl_mean": _mean(kl),
        "eval/kl_per_token": sum(kl) / max(sum(len_ppo), 1),
        "eval/response_len_ppo": _mean(len_ppo),
        "eval/response_len_sft": _mean(len_sft),
        "eval/response_chars_ppo": _mean([len(t) for t in ppo_texts]),
        "eval/response_chars_sft": _mean([len(t) for t in sft_texts]),
        "eval/frac_identical_responses": _mean([float(a == b) for a, b in zip(ppo_tokens, sft_tokens)]),
    }
    for name, tokens, texts in (("ppo", ppo_tokens, ppo_texts), ("sft", sft_tokens, sft_texts)):
        for key, value in repetition_stats(tokens, texts).items():
            out[f"eval/hack/{key}_{name}"] = value
    if gold_ppo is not None and gold_sft is not None:
        gwr = win_rate(gold_ppo, gold_sft)
        out.update(
            {
                "eval/gold_win_rate_vs_sft": gwr,
                "eval/gold_win_rate_stderr": math.sqrt(gwr * (1 - gwr) / n) if n else float("nan"),
                "eval/gold_mean_ppo": _mean(gold_ppo),
                "eval/gold_mean_sft": _mean(gold_sft),
                "eval/gold_margin_mean": _mean([a - b for a, b in zip(gold_ppo, gold_sft)]),
                # > 0: the reward model thinks PPO improved more than it truly did (over-optimization)
                "eval/proxy_gold_win_gap": wr - gwr,
                "eval/rm_gold_corr": _corr(list(reward_ppo) + list(reward_sft), list(gold_ppo) + list(gold_sft)),
            }
        )
    return out


# --------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------


def compare(
    cfg: Any,
    ctx: Any,
    ppo_path: Path,
    sft_path: Path,
    rm_path: Path,
    questions: Sequence[str],
    gold: Callable[[list[str], list[str]], list[float]] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Generate, score and compare; returns ``(metrics, one record per question)``."""
    from stackllama.data import format_prompt

    ev, device, seed = cfg.eval, ctx.device, int(cfg.seed)
    sampling = sampling_settings(cfg)
    mixed = precision.run_mode(cfg)
    bs, max_new = int(ev.batch_size), int(ev.max_new_tokens)
    metrics: dict[str, float] = {}
    if bs < 1 or max_new < 1:
        raise ValueError("eval.batch_size and eval.max_new_tokens must be >= 1")

    # 1. The PPO policy: its responses and their log-probs under it --------------------
    t0 = time.time()
    model, tok_ppo = load_lm(ppo_path, cfg, device)
    qs, query_ids, skipped = encode_queries(
        questions, cfg.data.prompt_template, tok_ppo, int(cfg.ppo.max_prompt_length), int(ev.num_questions)
    )
    if not qs:
        raise ValueError(
            f"no evaluation question fits ppo.max_prompt_length={cfg.ppo.max_prompt_length} "
            f"({skipped} skipped) or the evaluation split is empty"
        )
    if skipped:
        log.info("eval: skipped %d questions longer than %d prompt tokens", skipped, cfg.ppo.max_prompt_length)
    log.info("eval: %d questions, %d new tokens, batches of %d", len(qs), max_new, bs)
    with precision.autocast(mixed, device):  # sampling; the log-probs below stay unrounded
        ppo_batches = sample(model, tok_ppo, qs, query_ids, max_new, bs, sampling, seed, device)
    logp_ppo = response_logprobs(model, ppo_batches, device, sampling.temperature)
    del model
    _release_memory()
    t1 = time.time()

    # 2. The SFT reference: its own responses (same seeds), log-probs of PPO's ---------
    model, tok_sft = load_lm(sft_path, cfg, device)
    same_vocab = tok_sft.get_vocab() == tok_ppo.get_vocab()
    sft_query_ids = (
        query_ids
        if same_vocab
        else [tok_sft(format_prompt(cfg.data.prompt_template, q), add_special_tokens=False)["input_ids"] for q in qs]
    )
    with precision.autocast(mixed, device):
        sft_batches = sample(model, tok_sft, qs, sft_query_ids, max_new, bs, sampling, seed, device)
    if same_vocab:
        logp_ref = response_logprobs(model, ppo_batches, device, sampling.temperature)
        kl = sequence_kl(logp_ppo, logp_ref, ppo_batches, str(cfg.ppo.kl_estimator))
    else:
        log.warning("eval: the PPO and SFT tokenizers differ; the KL to the reference is not defined")
        kl = [float("nan")] * len(qs)
    del model
    _release_memory()
    t2 = time.time()

    ppo_texts = [r for bt in ppo_batches for r in bt.responses]
    sft_texts = [r for bt in sft_batches for r in bt.responses]
    ppo_tokens = [t for bt in ppo_batches for t in bt.token_lists()]
    sft_tokens = [t for bt in sft_batches for t in bt.token_lists()]

    # 3. Reward model (the proxy) and gold scorer (the truth, synthetic data only) ------
    reward_ppo, reward_sft = score_both(cfg, rm_path, device, qs, ppo_texts, sft_texts)
    gold_ppo = gold_sft = None
    if gold is not None:
        gold_ppo = [float(x) for x in gold(list(qs), ppo_texts)]
        gold_sft = [float(x) for x in gold(list(qs), sft_texts)]
    t3 = time.time()

    metrics.update(
        summarize(ppo_tokens, ppo_texts, sft_tokens, sft_texts, reward_ppo, reward_sft, kl, gold_ppo, gold_sft)
    )
    metrics.update(
        {
            "eval/skipped_too_long": skipped,
            "time/eval/ppo_s": round(t1 - t0, 3),
            "time/eval/sft_s": round(t2 - t1, 3),
            "time/eval/score_s": round(t3 - t2, 3),
        }
    )
    columns = {
        "sft": sft_texts,
        "ppo": ppo_texts,
        "reward_sft": reward_sft,
        "reward_ppo": reward_ppo,
        "kl": kl,
        "len_sft": [len(t) for t in sft_tokens],
        "len_ppo": [len(t) for t in ppo_tokens],
    }
    if gold_ppo is not None and gold_sft is not None:
        columns.update({"gold_sft": gold_sft, "gold_ppo": gold_ppo})
    records = [{"question": q, **{k: v[i] for k, v in columns.items()}} for i, q in enumerate(qs)]
    return metrics, records


def reward_scorer(cfg: Any, rm_path: Path, device: Any) -> Any:
    """The reward model as PPO scores with it (``ppo.reward_batch_size``, ``rm.max_length``, precision)."""
    from stackllama.reward import RewardScorer

    return RewardScorer.from_pretrained(
        rm_path,
        device=device,
        batch_size=int(cfg.ppo.reward_batch_size),
        max_length=int(cfg.rm.max_length),
        template=cfg.data.prompt_template,
        quant_cfg=cfg.quantization,
        mixed_precision=precision.run_mode(cfg),
    )


def score_both(
    cfg: Any, rm_path: Path, device: Any, questions: Sequence[str], ppo_texts: list[str], sft_texts: list[str]
) -> tuple[list[float], list[float]]:
    """The reward model's scores of both sides' responses."""
    scorer = reward_scorer(cfg, rm_path, device)
    reward_ppo, reward_sft = scorer.score(questions, ppo_texts).tolist(), scorer.score(questions, sft_texts).tolist()
    del scorer
    _release_memory()
    return reward_ppo, reward_sft


def relabel(record: Mapping[str, Any], policy: str) -> dict[str, Any]:
    """Keys written for a PPO policy (``eval/reward_mean_ppo``, a record's ``gold_ppo``) named for
    the method under test (``eval.policy``): ``eval/reward_mean_dpo`` when DPO's policy is judged."""
    if policy == "ppo":
        return dict(record)
    out = {}
    for key, value in record.items():
        if key == "ppo":
            key = policy
        elif key.endswith("_ppo"):
            key = key[: -len("ppo")] + policy
        out[key.replace("_ppo_", f"_{policy}_").replace("/ppo_", f"/{policy}_")] = value
    return out


def evaluate(cfg: Any, ctx: Any, policy_path: Path, sft_path: Path, rm_path: Path) -> float:
    """Compare the policy under test (``eval.policy``) with SFT, record the figures, write the
    report; returns the objective."""
    from stackllama.data import build_dataset, gold_scorer
    from stackllama.stages.eval_report import method_label, write_report

    started = time.time()
    policy = str(cfg.eval.policy)
    splits = build_dataset(cfg.data)
    gold = gold_scorer(cfg.data)
    metrics, records = compare(
        cfg, ctx, Path(policy_path), Path(sft_path), Path(rm_path), list(splits.evaluation["question"]), gold
    )
    if cfg.eval.best_of_n:
        from stackllama.stages import best_of_n

        t = time.time()
        sft_scores = {  # the SFT responses the policy was judged against: best-of-n's baseline too
            "reward": [r["reward_sft"] for r in records],
            "gold": [r["gold_sft"] for r in records] if records and "gold_sft" in records[0] else None,
        }
        questions = list(splits.evaluation["question"])
        metrics.update(best_of_n.evaluate_sft(cfg, ctx, sft_path, rm_path, questions, gold, sft_scores))
        metrics["time/eval/best_of_n_s"] = round(time.time() - t, 3)
    metrics["time/stage/eval_s"] = round(time.time() - started, 3)
    upstream = {policy: Path(policy_path), "sft": Path(sft_path), "rm": Path(rm_path)}
    reused = {s: ctx.metrics.values.get(f"upstream/{s}/reused") for s in upstream}
    report = write_report(
        cfg, Path(ctx.run_dir), {**ctx.metrics.values, **metrics}, records, upstream, reused, ctx.tracker
    )
    metrics, records = relabel(metrics, policy), [relabel(r, policy) for r in records]
    ctx.metrics.update({**metrics, "eval/report": str(report)})
    with open(Path(ctx.run_dir) / "eval_samples.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    ctx.tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    gold_txt = ""
    if "eval/gold_win_rate_vs_sft" in metrics:
        gold_txt = (
            f"; gold win rate {metrics['eval/gold_win_rate_vs_sft']:.3f}, gold mean "
            f"{metrics['eval/gold_mean_sft']:.3f} -> {metrics[f'eval/gold_mean_{policy}']:.3f}"
        )
    log.info(
        "eval: %s beats SFT in %.3f of %d questions (RM); reward %.3f -> %.3f; KL %.3f%s. Report: %s",
        method_label(cfg),
        metrics[OBJECTIVE],
        metrics["eval/num_questions"],
        metrics["eval/reward_mean_sft"],
        metrics[f"eval/reward_mean_{policy}"],
        metrics["eval/kl_mean"],
        gold_txt,
        report,
    )
    return float(metrics[OBJECTIVE])


def run(cfg: Any, ctx: Any) -> float:
    from stackllama.pipeline import resolve

    inputs = resolve("eval", cfg, ctx)  # SFT, RM and the policy found or built in order; explicit paths honoured
    return evaluate(cfg, ctx, inputs[str(cfg.eval.policy)], inputs["sft"], inputs["rm"])


__all__ = [
    "run",
    "evaluate",
    "relabel",
    "compare",
    "summarize",
    "win_rate",
    "eval_questions",
    "sample",
    "response_logprobs",
    "sequence_kl",
    "OBJECTIVE",
]
