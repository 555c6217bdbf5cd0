"""Best-of-n sampling from the SFT model: the RL-free baseline every RLHF method is judged against.

For each held-out question, sample ``N = max(eval.best_of_n)`` responses from the SFT policy once
(PPO's sampling settings); for each n in ``eval.best_of_n`` keep the reward model's favourite of the
first n and report its mean RM score and gold score. The KL of best-of-n to the policy it samples
from has a closed form (Stiennon et al. 2020; Gao et al. 2022, eq. 1):

    KL_bon(n) = log n - (n - 1) / n

so the frontier of RM and gold score against sqrt(KL) can be drawn beside the RL methods' without
estimating any KL. ``evaluate`` runs it when ``eval.best_of_n`` is set and records
``eval/bon/<n>/reward_mean``, ``.../gold_mean`` and ``.../kl``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch


def bon_kl(n: int) -> float:
    """KL(best-of-n || policy) = log n - (n - 1) / n, in nats (0 for n = 1)."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def select(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(Q, N) scores of N samples per question -> (Q,) index of the best of the first n."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"best-of-{n} from {scores.shape[1]} samples")
    return scores[:, :n].argmax(1)


def frontier(
    rm: torch.Tensor, gold: Optional[torch.Tensor], ns: Sequence[int], baseline: Optional[dict[str, list]] = None
) -> dict[str, float]:
    """``eval/bon/<n>/...`` for each n: the mean RM (and gold) score of the RM's pick, and its KL.

    ``rm`` and ``gold`` are (Q, N): question q's N samples, scored. With ``baseline`` (the eval
    stage's own SFT response to each question, scored: ``{"reward": [...], "gold": [...]}``) also
    the pick's win rate over it (ties half), by the RM and by the gold scorer, as the policies'."""
    from stackllama.stages.eval import win_rate

    out: dict[str, float] = {}
    rows = torch.arange(rm.shape[0])
    for n in sorted(set(int(x) for x in ns)):
        pick = select(rm, n)  # (Q,)
        out[f"eval/bon/{n}/reward_mean"] = float(rm[rows, pick].mean())
        if gold is not None:
            out[f"eval/bon/{n}/gold_mean"] = float(gold[rows, pick].mean())
        out[f"eval/bon/{n}/kl"] = bon_kl(n)
        if baseline and len(baseline.get("reward", [])) == rm.shape[0]:
            out[f"eval/bon/{n}/win_rate_vs_sft"] = win_rate(rm[rows, pick].tolist(), baseline["reward"])
            if gold is not None and len(baseline.get("gold") or []) == rm.shape[0]:
                out[f"eval/bon/{n}/gold_win_rate_vs_sft"] = win_rate(gold[rows, pick].tolist(), baseline["gold"])
    return out


def run(
    model: Any,
    tokenizer: Any,
    questions: Sequence[str],
    query_ids: Sequence[Sequence[int]],
    ns: Sequence[int],
    max_new_tokens: int,
    sampling: Any,
    seed: int,
    device: torch.device,
    score: Callable[[list[str], list[str]], torch.Tensor],
    gold: Optional[Callable[[list[str], list[str]], list[float]]] = None,
    batch_size: int = 16,
    baseline: Optional[dict[str, list]] = None,
) -> dict[str, float]:
    """Sample ``max(ns)`` responses per question from ``model`` and return ``frontier``'s figures."""
    from stackllama.stages.eval import sample

    N = max(int(x) for x in ns)
    qs = [q for q in questions for _ in range(N)]  # question q's samples are rows q*N .. q*N+N-1
    ids = [list(x) for x in query_ids for _ in range(N)]
    bs = max(N, batch_size // N * N)  # whole questions per generate call
    batches = sample(model, tokenizer, qs, ids, max_new_tokens, bs, sampling, seed, device)
    texts = [r for bt in batches for r in bt.responses]
    rm = score(qs, texts).float().view(len(questions), N)  # (Q, N)
    gold_scores = None
    if gold is not None:
        gold_scores = torch.tensor(gold(qs, texts), dtype=torch.float32).view(len(questions), N)
    return frontier(rm, gold_scores, ns, baseline)


def evaluate_sft(
    cfg: Any,
    ctx: Any,
    sft_path: Any,
    rm_path: Any,
    questions: Sequence[str],
    gold: Any = None,
    baseline: Optional[dict[str, list]] = None,
) -> dict[str, float]:
    """``run`` on the SFT model for ``eval.best_of_n``, scored by the reward model as PPO scores."""
    from stackllama import precision
    from stackllama.stages.eval import encode_queries, load_lm, reward_scorer, sampling_settings

    ev = cfg.eval
    model, tok = load_lm(sft_path, cfg, ctx.device)
    qs, query_ids, _ = encode_queries(
        questions, cfg.data.prompt_template, tok, int(cfg.ppo.max_prompt_length), int(ev.num_questions)
    )
    scorer = reward_scorer(cfg, rm_path, ctx.device)
    with precision.autocast(precision.run_mode(cfg), ctx.device):
        return run(
            model,
            tok,
            qs,
            query_ids,
            list(ev.best_of_n),
            int(ev.max_new_tokens),
            sampling_settings(cfg),
            int(cfg.seed),
            ctx.device,
            scorer.score,
            gold,
            int(ev.batch_size),
            baseline,
        )


__all__ = ["bon_kl", "select", "frontier", "run", "evaluate_sft"]
