"""The record schema every source is converted to, and the vote -> pm_score rule.

A record is a plain dict (the HuggingFaceH4/stack-exchange-preferences layout)::

    {"qid": str, "question": str, "date": str, "metadata": dict,
     "answers": [{"answer_id": str, "pm_score": int, "selected": bool,
                  "text": str, "score": int}, ...]}

pm_score rule (shared by the Stack Exchange dump reader and the synthetic generator)::

    score >= 0:  pm_score = round(log2(1 + score)) + (1 if accepted else 0)
    score <  0:  pm_score = -1            (accepted or not: the community disagreed)

so score 0 -> 0, 1 -> 1, 2 -> 2, 3 -> 2, 7 -> 3; accepted adds 1 (0 -> 1, 3 -> 3);
score -1 -> -1 and an accepted answer with score -1 is still -1. ``round`` is Python's
(half to even), which never matters here: log2(1 + n) is never exactly k + 0.5.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any, Iterable

log = logging.getLogger(__name__)


def pm_score(score: int, accepted: bool = False) -> int:
    """Preference-model score of one answer from its vote score (see the module docstring)."""
    score = int(score)
    if score < 0:
        return -1
    return int(round(math.log2(1 + score))) + (1 if accepted else 0)


def bump(stats: dict[str, Any], key: str, n: int = 1) -> None:
    """Add ``n`` to a counter in a flat stats dict (keys like ``data/skipped_empty_answers``)."""
    stats[key] = stats.get(key, 0) + n


def filter_min_answers(records: list[dict], min_answers: int, stats: dict[str, Any]) -> list[dict]:
    """Drop questions with fewer than ``min_answers`` answers, counting them."""
    kept = [r for r in records if len(r["answers"]) >= min_answers]
    bump(stats, "data/skipped_few_answers", len(records) - len(kept))
    return kept


def cap_questions(records: list[dict], max_questions: int | None, seed: int) -> list[dict]:
    """Keep a seeded random subset of ``max_questions`` records, in their original order."""
    if max_questions is None or len(records) <= max_questions:
        return records
    keep = sorted(random.Random(seed).sample(range(len(records)), int(max_questions)))
    return [records[i] for i in keep]


def count_records(records: Iterable[dict], stats: dict[str, Any]) -> dict[str, Any]:
    """Set ``data/questions`` and ``data/answers`` from the final records."""
    records = list(records)
    stats["data/questions"] = len(records)
    stats["data/answers"] = sum(len(r["answers"]) for r in records)
    return stats


def log_stats(stats: dict[str, Any], what: str) -> None:
    log.info("%s: %s", what, ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))
