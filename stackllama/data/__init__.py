"""Data pipeline: records from a source, then the StackLlama splits as ``datasets.Dataset``s.

Public API::

    load_records(data_cfg) -> (records, stats)       # data.source dispatch + filters
    build_splits(records, data_cfg) -> Splits         # pairs / texts / prompts per split
    build_dataset(data_cfg) -> Splits                 # both, stats merged
    gold_scorer(data_cfg) -> callable | None          # synthetic gold_score_batch

Sources (``data.source``): ``synthetic`` (stackllama.data.synthetic), ``stackexchange_dump``
(a site's Posts.xml: stackllama.data.stackexchange), ``h4_preferences`` and ``paired``
(hub layouts, local copy or reachable hub: stackllama.data.hub). Records follow
stackllama.data.records; pairs, splits and prompts stackllama.data.recipe.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import datasets

from stackllama.data.recipe import (
    SPLIT_NAMES,
    format_prompt,
    format_text,
    make_pairs,
    split_questions,
    winning_answers,
)
from stackllama.data.records import cap_questions, count_records, filter_min_answers, log_stats, pm_score

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "stackexchange_dump", "h4_preferences", "paired")

FINETUNE_FEATURES = datasets.Features(
    {"question": datasets.Value("string"), "answer": datasets.Value("string"), "text": datasets.Value("string")}
)
PAIR_FEATURES = datasets.Features(
    {
        "question": datasets.Value("string"),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "chosen_pm": datasets.Value("int64"),
        "rejected_pm": datasets.Value("int64"),
    }
)
RL_FEATURES = datasets.Features({"question": datasets.Value("string"), "query": datasets.Value("string")})


@dataclass
class Splits:
    """The four question-disjoint splits of the recipe."""

    finetune: datasets.Dataset  # question, answer, text (templated question + answer)
    reward: datasets.Dataset  # question, chosen, rejected, chosen_pm, rejected_pm
    rl: datasets.Dataset  # question, query (template with an empty answer)
    evaluation: datasets.Dataset  # same columns as reward
    stats: dict[str, Any] = field(default_factory=dict)


def load_records(data_cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    """Records of ``data_cfg.source`` after ``min_answers`` and ``max_questions``, with stats."""
    source = data_cfg.source
    if source == "synthetic":
        from stackllama.data.synthetic import generate_records

        records, stats = generate_records(data_cfg)
    elif source == "stackexchange_dump":
        from stackllama.data.stackexchange import load_posts

        if not data_cfg.path:
            raise ValueError("data.source=stackexchange_dump needs data.path= a site folder or its Posts.xml")
        records, stats = load_posts(data_cfg.path, min_answers=int(data_cfg.min_answers))
    elif source == "h4_preferences":
        from stackllama.data.hub import load_h4_preferences

        records, stats = load_h4_preferences(data_cfg)
    elif source == "paired":
        from stackllama.data.hub import load_paired

        records, stats = load_paired(data_cfg)
    else:
        raise ValueError(f"data.source={source!r} is not valid; choose one of: {', '.join(SOURCES)}")
    stats = dict(stats)
    records = filter_min_answers(records, int(data_cfg.min_answers), stats)
    capped = cap_questions(records, data_cfg.max_questions, int(data_cfg.seed))
    stats["data/capped_questions"] = len(records) - len(capped)
    count_records(capped, stats)
    log_stats(stats, f"records from {source}")
    if not capped:
        raise NoUsableRecords(no_usable_records_message(data_cfg, stats))
    return capped, stats


# What each source needs from a row to make a record (for the "no usable records" message).
REQUIRED = {
    "synthetic": "data.synthetic.num_questions >= 1",
    "stackexchange_dump": "Posts.xml <row> elements with Id, PostTypeId (1 question, 2 answer), a non-empty Body, "
    "and ParentId on answers",
    "h4_preferences": "columns qid, question, answers (a list of {text, pm_score})",
    "paired": "columns qid, question, response_j, response_k (response_j the better answer)",
}


class NoUsableRecords(ValueError):
    """A data source that yields no question a stage could train on."""


def data_location(data_cfg: Any) -> str:
    if data_cfg.source == "synthetic":
        return "the synthetic corpus"
    return str(data_cfg.path or data_cfg.hub_id)


def no_usable_records_message(data_cfg: Any, stats: dict[str, Any], what: str = "records") -> str:
    """``No usable records in <path>: ...`` with each cause counted and the columns a source needs."""
    causes = []
    rows = stats.get("data/rows")
    if rows is not None:
        causes.append(f"{rows} rows read")
    malformed = stats.get("data/skipped_malformed_rows", 0)
    if malformed:
        cols = stats.get("data/missing_columns")
        causes.append(f"{malformed} rows skipped as malformed" + (f" (missing columns: {cols})" if cols else ""))
    for key, label in (
        ("data/skipped_empty_questions", "questions with an empty body"),
        ("data/skipped_empty_answers", "answers with an empty body"),
        ("data/skipped_other_post_types", "rows of other post types"),
        ("data/skipped_orphan_answers", "answers to no question in the file"),
    ):
        if stats.get(key):
            causes.append(f"{stats[key]} {label}")
    few = stats.get("data/skipped_few_answers", 0)
    if few:
        causes.append(f"{few} questions with fewer than data.min_answers={data_cfg.min_answers} answers")
    return (
        f"No usable {what} in {data_location(data_cfg)}: "
        + ("; ".join(causes) or "it is empty")
        + f". data.source={data_cfg.source} needs {REQUIRED.get(data_cfg.source, 'records')}, and questions "
        "with at least data.min_answers answers"
    )


def _pair_rows(records: list[dict], rng: random.Random, max_pairs: Optional[int]) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in PAIR_FEATURES}
    for rec in records:
        for better, worse in make_pairs(rec, rng, max_pairs):
            cols["question"].append(rec["question"])
            cols["chosen"].append(better["text"])
            cols["rejected"].append(worse["text"])
            cols["chosen_pm"].append(int(better["pm_score"]))
            cols["rejected_pm"].append(int(worse["pm_score"]))
    return cols


def build_splits(records: list[dict], data_cfg: Any) -> Splits:
    """Split questions (deterministic by ``data_cfg.seed``) and build each split's rows."""
    seed = int(data_cfg.seed)
    template = data_cfg.prompt_template
    max_pairs = data_cfg.max_pairs_per_question
    parts = split_questions(records, data_cfg.splits, seed)

    ft: dict[str, list] = {k: [] for k in FINETUNE_FEATURES}
    for rec in parts["finetune"]:
        for ans in winning_answers(rec):
            ft["question"].append(rec["question"])
            ft["answer"].append(ans["text"])
            ft["text"].append(format_text(template, rec["question"], ans["text"]))
    reward = _pair_rows(parts["reward"], random.Random(f"{seed}-reward"), max_pairs)
    evaluation = _pair_rows(parts["evaluation"], random.Random(f"{seed}-evaluation"), max_pairs)
    rl = {
        "question": [r["question"] for r in parts["rl"]],
        "query": [format_prompt(template, r["question"]) for r in parts["rl"]],
    }
    stats: dict[str, Any] = {
        "data/finetune_texts": len(ft["text"]),
        "data/reward_pairs": len(reward["chosen"]),
        "data/rl_prompts": len(rl["query"]),
        "data/eval_pairs": len(evaluation["chosen"]),
        "data/finetune_questions": len(parts["finetune"]),
        "data/reward_questions": len(parts["reward"]),
        "data/rl_questions": len(parts["rl"]),
        "data/eval_questions": len(parts["evaluation"]),
    }
    log_stats(stats, "splits")
    return Splits(
        finetune=datasets.Dataset.from_dict(ft, features=FINETUNE_FEATURES),
        reward=datasets.Dataset.from_dict(reward, features=PAIR_FEATURES),
        rl=datasets.Dataset.from_dict(rl, features=RL_FEATURES),
        evaluation=datasets.Dataset.from_dict(evaluation, features=PAIR_FEATURES),
        stats=stats,
    )


def gold_scorer(data_cfg: Any) -> Optional[Callable[[list[str], list[str]], list[float]]]:
    """``gold_score_batch(questions, answers)`` for synthetic data, else None."""
    if data_cfg.source == "synthetic":
        from stackllama.data.synthetic import gold_score_batch

        return gold_score_batch
    return None


def build_dataset(data_cfg: Any) -> Splits:
    """``load_records`` + ``build_splits``, with both stats merged."""
    records, stats = load_records(data_cfg)
    splits = build_splits(records, data_cfg)
    splits.stats = {**stats, **splits.stats}
    return splits


__all__ = [
    "SOURCES",
    "SPLIT_NAMES",
    "NoUsableRecords",
    "Splits",
    "build_dataset",
    "build_splits",
    "format_prompt",
    "format_text",
    "gold_scorer",
    "load_records",
    "make_pairs",
    "pm_score",
]
