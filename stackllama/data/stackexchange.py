"""Read one site's ``Posts.xml`` from the official Stack Exchange data dump into records.

The file is streamed (``XMLPullParser`` fed 1 MiB chunks; each ``<row>`` is cleared once
read), so memory stays bounded by the kept text, not the XML tree. ``PostTypeId`` 1 is a
question, 2 an answer (``ParentId`` -> its question); other post types (tag wikis,
moderator nominations, ...) are skipped and counted. A question's text is
``Title + "\\n\\n" + body`` (body only when it has no title); bodies go from HTML to
Markdown with ``markdownify`` and ``<pre><code>`` blocks become ``` fences.

pm_score rule (``stackllama.data.records.pm_score``)::

    score >= 0:  pm_score = round(log2(1 + score)) + (1 if the answer is accepted else 0)
    score <  0:  pm_score = -1, accepted or not

Bad input is counted in the returned stats (flat keys, also logged), never silently lost:

- ``data/skipped_malformed_rows``: rows without an integer ``Id`` / ``PostTypeId``, a
  non-integer ``Score``, a duplicate ``Id``, or an answer without a usable ``ParentId``
  or whose ``ParentId`` names no question in the file (these last are also in
  ``data/skipped_orphan_answers``). A row with no ``Score`` attribute counts as score 0.
- ``data/skipped_empty_questions`` / ``data/skipped_empty_answers``: missing ``Body`` or
  a body that is empty once converted (answers to a skipped question are counted in
  ``data/skipped_answers_of_skipped_questions``).
- ``data/skipped_other_post_types``, ``data/skipped_few_answers`` (< ``min_answers``).
- ``data/rows_with_invalid_utf8``: bytes that are not valid UTF-8 are decoded as U+FFFD
  (``errors="replace"``) and the row is KEPT; ``data/invalid_utf8_bytes`` counts the
  replaced sequences. (Rows that already contained a literal U+FFFD are counted too.)
- A file that is not well-formed XML (truncated, garbage) raises ``ValueError`` naming
  the file, line and column; a missing path raises ``FileNotFoundError`` naming it.
"""

from __future__ import annotations

import codecs
import logging
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Iterator

from markdownify import MarkdownConverter

from stackllama.data.records import bump, count_records, filter_min_answers, log_stats, pm_score

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
REPLACEMENT = "\ufffd"


class _Converter(MarkdownConverter):
    """markdownify with ATX headings; ``<pre>`` already renders as a ``` fence."""

    def __init__(self, **options: Any) -> None:
        options.setdefault("heading_style", "ATX")
        options.setdefault("bullets", "-")
        super().__init__(**options)


_CONVERTER = _Converter()
_BLANK_LINES = re.compile(r"\n{3,}")


def html_to_markdown(html: str) -> str:
    """Convert a post body to Markdown; code blocks become fenced ``` blocks."""
    if not html or not html.strip():
        return ""
    text = _CONVERTER.convert(html)
    return _BLANK_LINES.sub("\n\n", text).strip()


def resolve_posts_path(path: str | Path) -> Path:
    """The ``Posts.xml`` at ``path`` (the file itself or the site folder holding it)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"Stack Exchange dump not found: {p} (pass data.path= a site folder or its Posts.xml)")
    if p.is_dir():
        candidates = [c for c in p.iterdir() if c.name.lower() == "posts.xml"]
        if not candidates:
            raise FileNotFoundError(f"no Posts.xml in {p}")
        p = sorted(candidates)[0]
    return p


def _decode_utf8(buf: bytes, final: bool) -> tuple[str, bytes, int]:
    """Decode as much of ``buf`` as possible, replacing invalid sequences with U+FFFD.

    Returns (text, undecoded tail kept for the next chunk, number of replacements).
    """
    out: list[str] = []
    replaced = 0
    pos = 0
    while True:
        try:
            text, consumed = codecs.utf_8_decode(buf[pos:], "strict", final)
            out.append(text)
            pos += consumed
            break
        except UnicodeDecodeError as err:
            out.append(codecs.utf_8_decode(buf[pos : pos + err.start], "strict", True)[0])
            out.append(REPLACEMENT)
            replaced += 1
            pos += err.end
    return "".join(out), buf[pos:], replaced


def _iter_rows(path: Path, stats: dict[str, Any]) -> Iterator[dict[str, str]]:
    """Stream the ``<row>`` attributes of a Posts.xml, with UTF-8 repair and clear errors."""
    parser = ET.XMLPullParser(events=("start", "end"))
    root = None
    tail = b""

    def events() -> Iterator[dict[str, str]]:
        nonlocal root
        for event, elem in parser.read_events():
            if event == "start":
                if root is None:
                    root = elem
                continue
            if elem.tag == "row":
                yield dict(elem.attrib)
                elem.clear()
                if root is not None:
                    root.clear()  # drop the cleared children the root still references

    def fail(err: ET.ParseError) -> ValueError:
        line, col = getattr(err, "position", (None, None))
        return ValueError(
            f"{path} is not well-formed XML at line {line}, column {col} ({err}); "
            "the file may be truncated or not a Stack Exchange Posts.xml"
        )

    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK_BYTES)
            final = not chunk
            text, tail, replaced = _decode_utf8(tail + chunk, final)
            if replaced:
                bump(stats, "data/invalid_utf8_bytes", replaced)
            try:
                if text:
                    # Fed as UTF-8 bytes: the XML declaration says utf-8 and we repaired it.
                    parser.feed(text.encode("utf-8"))
                if final:
                    parser.close()
                rows = list(events())  # read_events re-raises errors the parser queued
            except ET.ParseError as err:
                raise fail(err) from None
            yield from rows
            if final:
                return


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except (ValueError, AttributeError):
        return None


def question_record(row: dict[str, str], qid: str, body: str, score: int, site: str) -> dict[str, Any]:
    """A question row as a record without answers: title + body as the question text, tags
    (``<a><b>`` in older dumps, ``|a|b|`` in newer ones) and the site in the metadata."""
    title = (row.get("Title") or "").strip()
    tags = re.findall(r"<([^<>]+)>", row.get("Tags") or "")
    if not tags and row.get("Tags"):
        tags = [t for t in (row.get("Tags") or "").strip("|").split("|") if t]
    return {
        "qid": qid,
        "question": f"{title}\n\n{body}" if title else body,
        "answers": [],
        "date": row.get("CreationDate", ""),
        "metadata": {"site": site, "title": title, "tags": tags, "score": score, "source": "stackexchange_dump"},
    }


def attach_answers(
    questions: dict[str, dict],
    answers: list[tuple[str, dict]],
    accepted: dict[str, str],
    skipped_questions: set[str],
    stats: dict[str, Any],
) -> None:
    """Give each question its answers (which may precede it in the file) with their pm_score;
    count the answers of skipped questions and the orphans."""
    for parent, ans in answers:
        if parent in questions:
            ans["selected"] = accepted.get(parent) == ans["answer_id"]
            ans["pm_score"] = pm_score(ans["score"], ans["selected"])
            questions[parent]["answers"].append(
                {k: ans[k] for k in ("answer_id", "pm_score", "selected", "text", "score")}
            )
        elif parent in skipped_questions:
            bump(stats, "data/skipped_answers_of_skipped_questions")
        else:
            bump(stats, "data/skipped_orphan_answers")
            bump(stats, "data/skipped_malformed_rows")


def load_posts(path: str | Path, min_answers: int = 2) -> tuple[list[dict], dict[str, Any]]:
    """Parse a site's Posts.xml into records (see the module docstring); returns (records, stats)."""
    posts_path = resolve_posts_path(path)
    site = posts_path.parent.name
    stats: dict[str, Any] = {}
    for key in (
        "data/rows",
        "data/skipped_malformed_rows",
        "data/skipped_orphan_answers",
        "data/skipped_empty_questions",
        "data/skipped_empty_answers",
        "data/skipped_answers_of_skipped_questions",
        "data/skipped_other_post_types",
        "data/rows_with_invalid_utf8",
        "data/invalid_utf8_bytes",
    ):
        stats[key] = 0

    questions: dict[str, dict] = {}  # qid -> record under construction (file order)
    accepted: dict[str, str] = {}  # qid -> accepted answer id
    skipped_questions: set[str] = set()
    answers: list[tuple[str, dict]] = []  # (parent qid, answer); resolved after the pass
    seen_ids: set[int] = set()

    for row in _iter_rows(posts_path, stats):
        bump(stats, "data/rows")
        if any(REPLACEMENT in v for v in row.values()):
            bump(stats, "data/rows_with_invalid_utf8")
        post_id, post_type = _int(row.get("Id")), _int(row.get("PostTypeId"))
        if post_id is None or post_type is None or post_id in seen_ids:
            bump(stats, "data/skipped_malformed_rows")
            continue
        seen_ids.add(post_id)
        if post_type not in (1, 2):
            bump(stats, "data/skipped_other_post_types")
            continue
        score = _int(row.get("Score", "0"))
        if score is None:
            bump(stats, "data/skipped_malformed_rows")
            continue
        body = html_to_markdown(row.get("Body") or "")
        if post_type == 1:
            qid = str(post_id)
            if not body:
                bump(stats, "data/skipped_empty_questions")
                skipped_questions.add(qid)
                continue
            questions[qid] = question_record(row, qid, body, score, site)
            if row.get("AcceptedAnswerId"):
                accepted[qid] = row["AcceptedAnswerId"].strip()
        else:
            parent = _int(row.get("ParentId"))
            if parent is None:
                bump(stats, "data/skipped_malformed_rows")
                continue
            if not body:
                bump(stats, "data/skipped_empty_answers")
                continue
            answers.append((str(parent), {"answer_id": str(post_id), "text": body, "score": score}))

    attach_answers(questions, answers, accepted, skipped_questions, stats)
    records = filter_min_answers(list(questions.values()), min_answers, stats)
    count_records(records, stats)
    if stats["data/rows"] == 0:
        log.warning("%s holds no <row> elements", posts_path)
    log_stats(stats, f"Stack Exchange dump {posts_path}")
    return records, stats
