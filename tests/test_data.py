"""Data pipeline: synthetic corpus + gold scorer, hub layouts, pairs, splits, public API."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from omegaconf import OmegaConf

from stackllama.config import DataConfig, SplitsConfig, SyntheticDataConfig
from stackllama.data import Splits, build_dataset, build_splits, gold_scorer, load_records
from stackllama.data.recipe import format_prompt, format_text, make_pairs, split_questions, winning_answers
from stackllama.data.synthetic import KNOWLEDGE_BASE, gold_features, gold_score, gold_score_batch, match_fact


def cfg(**kw):
    kw.setdefault("seed", 0)
    return OmegaConf.structured(DataConfig(**kw))


def small(seed=0, n=300, **kw):
    return cfg(seed=seed, synthetic=SyntheticDataConfig(num_questions=n), **kw)


@pytest.fixture(scope="module")
def synthetic_records():
    records, stats = load_records(cfg(seed=0))
    return records, stats


# --------------------------------------------------------------------------------------
# Synthetic corpus
# --------------------------------------------------------------------------------------


def test_synthetic_schema_and_counts(synthetic_records):
    records, stats = synthetic_records
    assert stats["data/questions"] == len(records) == 1200
    assert stats["data/answers"] == sum(len(r["answers"]) for r in records)
    for r in records[:50]:
        assert set(r) == {"qid", "question", "answers", "date", "metadata"}
        assert 2 <= len(r["answers"]) <= 5
        for a in r["answers"]:
            assert set(a) == {"answer_id", "pm_score", "selected", "text", "score"}
            assert isinstance(a["pm_score"], int) and isinstance(a["score"], int)
    words = [len(a["text"].split()) for r in records for a in r["answers"]]
    assert 15 <= sum(words) / len(words) <= 60
    assert sum(w > 130 for w in words) / len(words) < 0.01
    domains = {r["metadata"]["domain"] for r in records}
    assert domains == {"beer", "audio", "python"}


def test_synthetic_is_deterministic_by_seed():
    a, _ = load_records(small(seed=1))
    b, _ = load_records(small(seed=1))
    c, _ = load_records(small(seed=2))
    assert a == b
    assert [r["answers"] for r in a] != [r["answers"] for r in c]


def test_synthetic_votes_follow_gold(synthetic_records):
    """Gold ranks the generator's chosen answer above the rejected one on most pairs."""
    records, _ = synthetic_records
    agree = total = 0
    for r in records:
        for better, worse in make_pairs(r, random.Random(0), None):
            total += 1
            agree += gold_score(r["question"], better["text"]) > gold_score(r["question"], worse["text"])
    frac = agree / total
    print(f"gold agrees with vote-ranked pairs on {frac:.3f} of {total} pairs (vote_noise 0.5)")
    assert 0.85 <= frac < 0.995  # high, but the vote noise keeps it below 1
    noisy, _ = load_records(cfg(synthetic=SyntheticDataConfig(num_questions=400, vote_noise=3.0)))
    agree_noisy = [
        gold_score(r["question"], b["text"]) > gold_score(r["question"], w["text"])
        for r in noisy
        for b, w in make_pairs(r, random.Random(0), None)
    ]
    assert sum(agree_noisy) / len(agree_noisy) < frac - 0.05  # more noise, lower ceiling


def test_pm_scores_spread(synthetic_records):
    records, _ = synthetic_records
    pms = {a["pm_score"] for r in records for a in r["answers"]}
    assert {-1, 0, 1, 2, 3, 4} <= pms
    assert any(a["selected"] for r in records for a in r["answers"])


GOOD_LAGER = (
    "Ferment a lager between 7 and 13 C, cold and slow, so the yeast stays clean. "
    "Healthy yeast and a clean fermentation matter more than fancy malt. "
    "Take notes on every batch so you can repeat what worked."
)
LAGER_Q = "What temperature should I ferment a lager at?\n\nI am brewing my first batch at home."


def test_gold_rewards_good_answers_and_penalizes_spam():
    good = gold_score(LAGER_Q, GOOD_LAGER)
    assert good >= 2.5
    spam = {
        "fences": "``` " * 40,
        "fence_blocks": "```\n```\n" * 10,
        "one_word": "beer " * 50,
        "keyword_loop": "7 and 13 C " * 20,
        "repeated_answer": " ".join([GOOD_LAGER] * 3),
        "empty": "",
    }
    for name, text in spam.items():
        assert gold_score(LAGER_Q, text) < good - 2.0, name
    wrong = "Ferment a lager warm, around 30 C, so it finishes in two days. Healthy yeast and a clean fermentation matter more than fancy malt."  # noqa: E501
    fact_free = "Healthy yeast and a clean fermentation matter more than fancy malt. Take notes on every batch so you can repeat what worked."  # noqa: E501
    assert good > gold_score(LAGER_Q, fact_free) > gold_score(LAGER_Q, wrong)
    filler = GOOD_LAGER + " My cat keeps walking across the keyboard. The traffic was terrible again."
    assert gold_score(LAGER_Q, filler) < good


def test_gold_code_questions_want_one_code_block():
    q = "Question: How do I reverse a list in Python?\n\nI want a short and readable solution.\n\nAnswer: "
    text = "Slice it with items[::-1] or loop over reversed(items). Keep the code readable, a short function is easier to test."  # noqa: E501
    block = "\n\n```python\nitems = [3, 1, 2]\nprint(items[::-1])\n```\n\n"
    with_code = text + block + "It is a common idiom, so other readers of your code will know it."
    assert gold_score(q, with_code) > gold_score(q, text) + 1.0
    assert gold_score(q, with_code + block + block) < gold_score(q, with_code) - 1.5
    assert gold_features(q, text + "\n```python\nitems[::-1]")["code"] < 0  # unclosed block


def test_gold_is_text_only_and_batched():
    for fact in KNOWLEDGE_BASE:
        assert match_fact(f"{fact.title}\n\nsome context") is fact
        assert match_fact(f"Question: {fact.title}\n\nAnswer: ") is fact
        assert gold_score(fact.title, fact.right) > gold_score(fact.title, fact.wrong)
    assert match_fact("What is the meaning of life?") is None
    qs, ans = [LAGER_Q, LAGER_Q], [GOOD_LAGER, "beer " * 30]
    assert gold_score_batch(qs, ans) == [gold_score(q, a) for q, a in zip(qs, ans)]
    with pytest.raises(ValueError):
        gold_score_batch(qs, ans[:1])
    assert gold_scorer(cfg()) is gold_score_batch
    assert gold_scorer(cfg(source="stackexchange_dump", path="x")) is None


# --------------------------------------------------------------------------------------
# Pairs, splits, prompts
# --------------------------------------------------------------------------------------


def _record(pms):
    return {
        "qid": "q",
        "question": "Q?",
        "date": "",
        "metadata": {},
        "answers": [
            {"answer_id": str(i), "pm_score": p, "selected": False, "text": f"a{i}", "score": p}
            for i, p in enumerate(pms)
        ],
    }


def test_make_pairs():
    rec = _record([2, 0, 2, -1, 5])
    pairs = make_pairs(rec, random.Random(0), None)
    assert len(pairs) == 9  # 10 combinations minus the (2, 2) tie
    assert all(b["pm_score"] > w["pm_score"] for b, w in pairs)
    capped = make_pairs(rec, random.Random(3), 4)
    assert len(capped) == 4 and set(map(id, itertools.chain(*capped))) <= set(map(id, rec["answers"]))
    assert [(b["answer_id"], w["answer_id"]) for b, w in capped] == [
        (b["answer_id"], w["answer_id"]) for b, w in make_pairs(rec, random.Random(3), 4)
    ]
    assert make_pairs(_record([1, 1, 1]), random.Random(0), 10) == []
    assert [a["answer_id"] for a in winning_answers(rec)] == ["0", "1", "2", "4"]


def test_prompt_template():
    t = DataConfig.prompt_template
    assert format_prompt(t, "Why {x}?") == "Question: Why {x}?\n\nAnswer: "
    assert format_text(t, "Q", "A") == "Question: Q\n\nAnswer: A"
    assert format_text(t, "Q", "A").startswith(format_prompt(t, "Q"))


def test_splits_deterministic_and_disjoint():
    records, _ = load_records(small(n=200))
    a = split_questions(records, SplitsConfig(), 0)
    b = split_questions(list(reversed(records)), SplitsConfig(), 0)  # order of arrival does not matter
    c = split_questions(records, SplitsConfig(), 1)
    ids = {k: [r["qid"] for r in v] for k, v in a.items()}
    assert ids == {k: [r["qid"] for r in v] for k, v in b.items()}
    assert ids != {k: [r["qid"] for r in v] for k, v in c.items()}
    flat = [q for v in ids.values() for q in v]
    assert len(flat) == len(set(flat)) == 200
    assert {k: len(v) for k, v in ids.items()} == {"finetune": 60, "reward": 60, "rl": 60, "evaluation": 20}
    odd = split_questions(records[:7], SplitsConfig(finetune=0.5, reward=0.5, rl=0.0, evaluation=0.0), 0)
    assert sum(len(v) for v in odd.values()) == 7 and not odd["rl"] and not odd["evaluation"]


def test_build_dataset_synthetic():
    c = small(n=200)
    s1, s2 = build_dataset(c), build_dataset(c)
    assert isinstance(s1, Splits) and gold_scorer(c) is not None
    assert s1.finetune.column_names == ["question", "answer", "text"]
    assert s1.reward.column_names == ["question", "chosen", "rejected", "chosen_pm", "rejected_pm"]
    assert s1.evaluation.column_names == s1.reward.column_names
    assert s1.rl.column_names == ["question", "query"]
    for name in ("finetune", "reward", "rl", "evaluation"):
        assert getattr(s1, name).to_list() == getattr(s2, name).to_list()
    st = s1.stats
    assert st["data/questions"] == 200
    assert st["data/finetune_texts"] == len(s1.finetune) > 0
    assert st["data/reward_pairs"] == len(s1.reward) > 0
    assert st["data/eval_pairs"] == len(s1.evaluation) > 0
    assert st["data/rl_prompts"] == len(s1.rl) == 60
    assert all(c > r for c, r in zip(s1.reward["chosen_pm"], s1.reward["rejected_pm"]))
    assert all(q.endswith("Answer: ") for q in s1.rl["query"])
    # questions are repeated across facts, so check disjointness by the split's records
    rec, _ = load_records(c)
    parts = split_questions(rec, c.splits, c.seed)
    assert len(s1.rl) == len(parts["rl"])


def test_load_records_filters_and_caps():
    records, stats = load_records(small(n=100, max_questions=30))
    assert len(records) == 30 and stats["data/questions"] == 30 and stats["data/capped_questions"] == 70
    again, _ = load_records(small(n=100, max_questions=30))
    assert [r["qid"] for r in records] == [r["qid"] for r in again]
    records, stats = load_records(small(n=100, min_answers=4))
    assert all(len(r["answers"]) >= 4 for r in records)
    assert stats["data/skipped_few_answers"] + len(records) == 100
    with pytest.raises(ValueError, match="synthetic, stackexchange_dump, h4_preferences, paired"):
        load_records(cfg(source="reddit"))


def test_empty_split_is_a_typed_empty_dataset():
    records, _ = load_records(small(n=10))
    c = small(n=10, splits=SplitsConfig(finetune=1.0, reward=0.0, rl=0.0, evaluation=0.0))
    s = build_splits(records, c)
    assert len(s.reward) == 0 and s.reward.column_names == [
        "question",
        "chosen",
        "rejected",
        "chosen_pm",
        "rejected_pm",
    ]
    assert len(s.finetune) > 0


# --------------------------------------------------------------------------------------
# Hub layouts from local files
# --------------------------------------------------------------------------------------

H4_ROWS = [
    {
        "qid": 1,
        "question": "How?",
        "date": "2020",
        "metadata": ["https://x"],
        "answers": [
            {"answer_id": 10, "author": "a", "pm_score": 3, "selected": True, "text": "Like this."},
            {"answer_id": 11, "author": "b", "pm_score": 1, "selected": False, "text": "Maybe."},
            {"answer_id": 12, "author": "c", "pm_score": 0, "selected": False, "text": ""},
        ],
    },
    {
        "qid": 2,
        "question": "Why?",
        "date": "2021",
        "metadata": [],
        "answers": [{"answer_id": 20, "pm_score": 2, "selected": False, "text": "Because."}],
    },
]

PAIRED_ROWS = [
    {"qid": 7, "question": "Q7", "date": "d", "metadata": ["m"], "response_j": "A", "response_k": "B"},
    {"qid": 7, "question": "Q7", "date": "d", "metadata": ["m"], "response_j": "A", "response_k": "C"},
    {"qid": 7, "question": "Q7", "date": "d", "metadata": ["m"], "response_j": "B", "response_k": "C"},
    {"qid": 8, "question": "Q8", "date": "d", "metadata": [], "response_j": "X", "response_k": "Y"},
    {"qid": 9, "question": "Q9", "date": "d", "metadata": [], "response_j": "", "response_k": "Y"},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_h4_preferences_from_jsonl(tmp_path):
    path = _jsonl(tmp_path / "h4.jsonl", H4_ROWS)
    records, stats = load_records(cfg(source="h4_preferences", path=str(path), min_answers=2))
    (rec,) = records
    assert rec["qid"] == "1" and rec["metadata"]["value"] == ["https://x"]
    assert [(a["answer_id"], a["pm_score"], a["selected"]) for a in rec["answers"]] == [
        ("10", 3, True),
        ("11", 1, False),
    ]
    assert stats["data/skipped_empty_answers"] == 1 and stats["data/skipped_few_answers"] == 1
    s = build_splits(
        records,
        cfg(
            source="h4_preferences",
            path=str(path),
            splits=SplitsConfig(finetune=0.0, reward=1.0, rl=0.0, evaluation=0.0),
        ),
    )
    assert s.reward.to_list() == [
        {"question": "How?", "chosen": "Like this.", "rejected": "Maybe.", "chosen_pm": 3, "rejected_pm": 1}
    ]


def test_paired_from_jsonl_folder_and_parquet(tmp_path):
    folder = tmp_path / "paired"
    folder.mkdir()
    _jsonl(folder / "part-0.jsonl", PAIRED_ROWS[:2])
    _jsonl(folder / "part-1.jsonl", PAIRED_ROWS[2:])
    records, stats = load_records(cfg(source="paired", path=str(folder)))
    by_qid = {r["qid"]: r for r in records}
    assert set(by_qid) == {"7", "8"}
    assert {a["text"]: a["pm_score"] for a in by_qid["7"]["answers"]} == {"A": 2, "B": 1, "C": 0}
    assert {a["text"]: a["pm_score"] for a in by_qid["8"]["answers"]} == {"X": 1, "Y": 0}
    assert stats["data/skipped_malformed_rows"] == 1
    pairs = make_pairs(by_qid["7"], random.Random(0), None)
    assert sorted((b["text"], w["text"]) for b, w in pairs) == [("A", "B"), ("A", "C"), ("B", "C")]

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(PAIRED_ROWS[:4]), tmp_path / "paired.parquet")
    again, _ = load_records(cfg(source="paired", path=str(tmp_path / "paired.parquet")))
    assert again == records


def test_hub_sources_without_network_say_use_data_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for source in ("h4_preferences", "paired"):
        with pytest.raises(RuntimeError, match="data.path="):
            load_records(cfg(source=source, hub_id="HuggingFaceH4/stack-exchange-preferences"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_records(cfg(source="paired", path=str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"qid": 1}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_records(cfg(source="paired", path=str(bad)))
