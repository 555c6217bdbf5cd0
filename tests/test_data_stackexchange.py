"""Stack Exchange dump reader: pm_score rule, HTML -> Markdown, real dumps, malformed input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from stackllama.config import DataConfig
from stackllama.data import build_dataset, load_records
from stackllama.data.recipe import split_questions
from stackllama.data.records import pm_score
from stackllama.data.stackexchange import html_to_markdown, load_posts

DUMPS = Path(__file__).resolve().parents[1].parent / "shared/data/stackexchange"
BEER = DUMPS / "beer.stackexchange.com"
AUDIO = DUMPS / "audio.stackexchange.com"


def _need(folder: Path) -> Path:
    if not (folder / "Posts.xml").exists():
        pytest.skip(f"Stack Exchange dump sample not available at {folder} (shared data folder absent)")
    return folder


# --------------------------------------------------------------------------------------
# pm_score rule
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score, accepted, expected",
    [
        (0, False, 0),
        (0, True, 1),
        (1, False, 1),
        (1, True, 2),
        (2, False, 2),  # round(log2 3) = round(1.585)
        (3, False, 2),
        (3, True, 3),
        (4, False, 2),  # round(log2 5) = round(2.32)
        (5, False, 3),  # round(log2 6) = round(2.58)
        (7, False, 3),
        (13, True, 5),
        (-1, False, -1),
        (-1, True, -1),  # negative stays -1 even when accepted
        (-7, True, -1),
    ],
)
def test_pm_score_edges(score, accepted, expected):
    assert pm_score(score, accepted) == expected


def test_pm_score_is_monotonic_in_score():
    values = [pm_score(s) for s in range(-3, 200)]
    assert values == sorted(values)
    assert all(pm_score(s) == round(math.log2(1 + s)) for s in range(0, 200))


# --------------------------------------------------------------------------------------
# HTML -> Markdown
# --------------------------------------------------------------------------------------


def test_html_to_markdown_keeps_code_blocks_as_fences():
    html = (
        "<p>Try this:</p>\n<pre><code>for x in range(3):\n    print(x)\n</code></pre>\n"
        "<p>and <code>inline</code> with <strong>bold</strong>.</p>"
    )
    md = html_to_markdown(html)
    assert "```\nfor x in range(3):\n    print(x)\n```" in md
    assert "`inline`" in md and "**bold**" in md
    assert "<pre>" not in md and "<code>" not in md and "<p>" not in md
    assert html_to_markdown("") == "" and html_to_markdown("<p> </p>") == ""


# --------------------------------------------------------------------------------------
# Real dumps (read from ../shared, never copied)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def beer_cfg():
    return OmegaConf.structured(DataConfig(seed=0, source="stackexchange_dump", path=str(_need(BEER))))


@pytest.fixture(scope="module")
def beer_splits(beer_cfg):
    return build_dataset(beer_cfg)


def test_beer_counts(beer_splits):
    stats = beer_splits.stats
    assert stats["data/questions"] == 410
    assert stats["data/skipped_malformed_rows"] == 0
    assert stats["data/skipped_other_post_types"] == 119  # tag wikis and excerpts
    assert stats["data/rows"] == 2354
    q = [stats[f"data/{s}_questions"] for s in ("finetune", "reward", "rl", "eval")]
    assert sum(q) == 410
    assert stats["data/reward_pairs"] == len(beer_splits.reward) > 0
    assert stats["data/eval_pairs"] == len(beer_splits.evaluation) > 0
    assert stats["data/rl_prompts"] == len(beer_splits.rl) == stats["data/rl_questions"]


def test_beer_pairs_and_splits(beer_cfg, beer_splits):
    for ds in (beer_splits.reward, beer_splits.evaluation):
        assert all(c > r for c, r in zip(ds["chosen_pm"], ds["rejected_pm"]))
        per_question: dict[str, int] = {}
        for q in ds["question"]:
            per_question[q] = per_question.get(q, 0) + 1
        assert max(per_question.values()) <= beer_cfg.max_pairs_per_question
    records, _ = load_records(beer_cfg)
    parts = split_questions(records, beer_cfg.splits, beer_cfg.seed)
    qids = [r["qid"] for part in parts.values() for r in part]
    assert len(qids) == len(set(qids)) == 410  # disjoint and covering every question
    assert set(qids) == {r["qid"] for r in records}
    assert {k: len(v) for k, v in parts.items()} == {"finetune": 123, "reward": 123, "rl": 123, "evaluation": 41}
    all_q = {r["question"] for r in records}
    assert len(all_q) == 410  # question texts are distinct in this dump
    ft = set(beer_splits.finetune["question"])
    rw = set(beer_splits.reward["question"])
    rl = set(beer_splits.rl["question"])
    ev = set(beer_splits.evaluation["question"])
    assert not (ft & rw or ft & rl or ft & ev or rw & rl or rw & ev or rl & ev)
    assert ft | rw | rl | ev <= all_q
    assert all(t.endswith("Answer: ") for t in beer_splits.rl["query"])
    assert all(t.startswith("Question: ") and "\n\nAnswer: " in t for t in beer_splits.finetune["text"])


def test_beer_record_details():
    records, stats = load_posts(_need(BEER) / "Posts.xml", min_answers=1)
    by_id = {r["qid"]: r for r in records}
    q1 = by_id["1"]  # "What is a citra hop...", one answer, accepted, score 13
    assert q1["question"].startswith("What is a citra hop, and how does it differ from other hops?\n\n")
    (ans,) = q1["answers"]
    assert ans["answer_id"] == "4" and ans["selected"] and ans["score"] == 13 and ans["pm_score"] == 5
    assert "[Wikipedia article](http" in ans["text"]
    texts = [a["text"] for r in records for a in r["answers"]]
    assert not any("<p>" in t or "<pre>" in t for t in texts)
    assert stats["data/questions"] + stats["data/skipped_few_answers"] == 663  # 19 unanswered


def test_audio_loads():
    records, stats = load_posts(_need(AUDIO))
    assert stats["data/questions"] == len(records) == 59
    assert all(len(r["answers"]) >= 2 for r in records)
    fenced = [a["text"] for r in records for a in r["answers"] if "```" in a["text"]]
    assert all(t.count("```") % 2 == 0 for t in fenced)


# --------------------------------------------------------------------------------------
# Malformed input
# --------------------------------------------------------------------------------------

HEADER = b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\n<posts>\n'


def _row(**attrs: str) -> bytes:
    return ("  <row " + " ".join(f'{k}="{v}"' for k, v in attrs.items()) + " />\n").encode()


def _good_question(qid: str, accepted: str = "") -> bytes:
    extra = {"AcceptedAnswerId": accepted} if accepted else {}
    return _row(
        Id=qid,
        PostTypeId="1",
        Score="3",
        Title=f"Question {qid}",
        Body="&lt;p&gt;Why?&lt;/p&gt;",
        CreationDate="2020-01-01T00:00:00",
        **extra,
    )


def _answer(aid: str, parent: str, score: str = "1", body: str = "&lt;p&gt;Because.&lt;/p&gt;") -> bytes:
    return _row(Id=aid, PostTypeId="2", ParentId=parent, Score=score, Body=body)


def test_malformed_rows_are_counted(tmp_path):
    content = (
        HEADER
        + _good_question("1", accepted="11")
        + _answer("10", "1", score="-2")
        + _answer("11", "1", score="3")
        + _answer("12", "1", score="0")
        + _row(PostTypeId="2", ParentId="1", Score="1", Body="&lt;p&gt;no id&lt;/p&gt;")  # missing Id
        + _row(Id="13", ParentId="1", Score="1", Body="&lt;p&gt;no type&lt;/p&gt;")  # missing PostTypeId
        + _answer("14", "1", score="many")  # non-integer Score
        + _answer("15", "1", body="")  # empty body
        + _row(Id="16", PostTypeId="2", ParentId="1", Score="1")  # missing body
        + _answer("17", "999")  # unknown question
        + _answer("18", "1", body="&lt;p&gt;caf@BAD@ latte&lt;/p&gt;")
        + b"</posts>\n"
    ).replace(b"@BAD@", b"\xff\xfe")  # two bytes that are not valid UTF-8
    path = tmp_path / "site"
    path.mkdir()
    (path / "Posts.xml").write_bytes(content)
    records, stats = load_posts(path, min_answers=2)
    assert stats["data/skipped_malformed_rows"] == 4  # no Id, no PostTypeId, bad Score, orphan
    assert stats["data/skipped_orphan_answers"] == 1
    assert stats["data/skipped_empty_answers"] == 2
    assert stats["data/rows_with_invalid_utf8"] == 1
    assert stats["data/invalid_utf8_bytes"] == 2
    (rec,) = records
    answers = {a["answer_id"]: a for a in rec["answers"]}
    assert set(answers) == {"10", "11", "12", "18"}
    assert answers["10"]["pm_score"] == -1
    assert answers["11"]["pm_score"] == 3 and answers["11"]["selected"]
    assert answers["12"]["pm_score"] == 0
    assert "\ufffd" in answers["18"]["text"]
    assert stats["data/questions"] == 1 and stats["data/answers"] == 4


def test_few_answers_dropped_and_answers_before_question(tmp_path):
    content = (
        HEADER
        + _answer("20", "2")  # answer listed before its question
        + _answer("21", "2")
        + _good_question("2")
        + _good_question("3")
        + _answer("30", "3")
        + _row(Id="4", PostTypeId="1", Score="1", Title="Empty", Body="")
        + _answer("40", "4")
        + b"</posts>\n"
    )
    (tmp_path / "Posts.xml").write_bytes(content)
    records, stats = load_posts(tmp_path / "Posts.xml", min_answers=2)
    assert [r["qid"] for r in records] == ["2"]
    assert stats["data/skipped_few_answers"] == 1
    assert stats["data/skipped_empty_questions"] == 1
    assert stats["data/skipped_answers_of_skipped_questions"] == 1


def test_truncated_file_raises_value_error(tmp_path):
    full = HEADER + _good_question("1") + _answer("10", "1") + _answer("11", "1") + b"</posts>\n"
    path = tmp_path / "Posts.xml"
    path.write_bytes(full[: len(full) - 30])
    with pytest.raises(ValueError, match=r"Posts\.xml is not well-formed XML at line \d+"):
        load_posts(path)
    path.write_bytes(HEADER + b"<row Id=1 oops></posts>")
    with pytest.raises(ValueError, match="line 3"):
        load_posts(path)


def test_missing_paths_raise_file_not_found(tmp_path):
    missing = tmp_path / "nope.stackexchange.com"
    with pytest.raises(FileNotFoundError, match="nope.stackexchange.com"):
        load_posts(missing)
    with pytest.raises(FileNotFoundError, match="no Posts.xml"):
        load_posts(tmp_path)
    cfg = OmegaConf.structured(DataConfig(seed=0, source="stackexchange_dump", path=str(missing)))
    with pytest.raises(FileNotFoundError, match="nope"):
        load_records(cfg)
