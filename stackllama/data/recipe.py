"""The StackLlama recipe on records: preference pairs, question-level splits, prompts.

- Pairs: every two answers of a question with different pm_score, better answer first;
  at most ``max_pairs_per_question`` per question, sampled with a seeded RNG.
- Splits: sorted question ids shuffled with ``random.Random(seed)`` and cut by the fractions of
  ``data.splits`` (finetune / reward / rl / evaluation); no question is in two splits and
  every question is in one.
- Prompts: ``data.prompt_template`` (default ``"Question: {question}\\n\\nAnswer: {answer}"``);
  an RL query is the template with an empty answer, so it ends with ``"Answer: "``.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

SPLIT_NAMES = ("finetune", "reward", "rl", "evaluation")


def format_text(template: str, question: str, answer: str) -> str:
    """The templated question + answer (an SFT text)."""
    return template.format(question=question, answer=answer)


def format_prompt(template: str, question: str) -> str:
    """The templated question with an empty answer (an RL query / generation prompt)."""
    return template.format(question=question, answer="")


def make_pairs(record: dict, rng: random.Random, max_pairs: int | None) -> list[tuple[dict, dict]]:
    """(better, worse) answer pairs of one question with different pm_score.

    All such pairs, in answer order, or ``max_pairs`` of them sampled with ``rng``
    (deterministic for a seeded ``rng``).
    """
    pairs = []
    for a, b in itertools.combinations(record["answers"], 2):
        if a["pm_score"] == b["pm_score"]:
            continue
        pairs.append((a, b) if a["pm_score"] > b["pm_score"] else (b, a))
    if max_pairs is not None and len(pairs) > max_pairs:
        keep = sorted(rng.sample(range(len(pairs)), int(max_pairs)))
        pairs = [pairs[i] for i in keep]
    return pairs


def clear_pairs(dataset: Any, min_margin: int) -> Any:
    """The pairs whose chosen answer's pm_score beats the rejected one's by at least ``min_margin``."""
    if min_margin <= 1:  # make_pairs keeps only pairs with different pm_scores: all pass
        return dataset
    return dataset.filter(lambda c, r: c - r >= min_margin, input_columns=["chosen_pm", "rejected_pm"])


def winning_answers(record: dict) -> list[dict]:
    """Answers that win at least one pair: every answer above the question's lowest pm_score."""
    if not record["answers"]:
        return []
    lowest = min(a["pm_score"] for a in record["answers"])
    return [a for a in record["answers"] if a["pm_score"] > lowest]


def split_sizes(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """Sizes from cumulative rounded boundaries, so they always sum to ``n``."""
    sizes, cum, prev = {}, 0.0, 0
    for name in SPLIT_NAMES:
        cum += float(fractions[name])
        bound = n if name == SPLIT_NAMES[-1] else min(n, int(round(n * cum)))
        sizes[name] = bound - prev
        prev = bound
    return sizes


def split_questions(records: list[dict], splits_cfg: Any, seed: int) -> dict[str, list[dict]]:
    """Assign each question to exactly one split, deterministic by ``seed``."""
    fractions = {name: float(getattr(splits_cfg, name)) for name in SPLIT_NAMES}
    qids = [r["qid"] for r in records]
    if len(set(qids)) != len(qids):
        raise ValueError("records have duplicate qids; a question could land in two splits")
    by_qid = {r["qid"]: r for r in records}
    order = sorted(by_qid)  # independent of the order records arrive in
    random.Random(seed).shuffle(order)
    out, start = {}, 0
    for name, size in split_sizes(len(order), fractions).items():
        out[name] = [by_qid[q] for q in order[start : start + size]]
        start += size
    return out
