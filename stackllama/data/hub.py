"""Hub-layout preference data sets, from a local copy or (only when reachable) the hub.

- ``h4_preferences``: HuggingFaceH4/stack-exchange-preferences, already the record schema
  (``qid, question, answers[answer_id, pm_score, selected, text, ...], date, metadata``).
  It has no raw vote score, so an answer's ``score`` is its ``score`` field when present
  and its ``pm_score`` otherwise.
- ``paired``: lvwerra/stack-exchange-paired (``qid, question, date, metadata,
  response_j, response_k``; ``response_j`` is the better answer). Rows are grouped by
  ``qid`` and identical answer texts merged; an answer's ``pm_score`` is the number of
  distinct answers it was preferred over, so a question with one pair gets
  ``response_j`` = 1 and ``response_k`` = 0, and a chain A > B > C keeps all three pairs.

Local copies (``data.path``): a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a folder
searched recursively for them. Read with plain ``json`` / ``pyarrow`` (no cache, no
network). The hub (``data.hub_id``) is used only when ``data.path`` is unset, a TCP
connect to huggingface.co:443 succeeds within 3 s and ``HF_HUB_OFFLINE`` is not set;
otherwise a ``RuntimeError`` says to pass ``data.path=`` a local copy.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable, Iterator

from stackllama.data.records import bump, count_records, log_stats

log = logging.getLogger(__name__)

HUB_TIMEOUT = 3.0
SUFFIXES = (".jsonl", ".json", ".parquet")


# --------------------------------------------------------------------------------------
# Reading rows
# --------------------------------------------------------------------------------------


def _data_files(path: Path) -> list[Path]:
    if not path.exists():
        raise FileNotFoundError(f"data file or folder not found: {path}")
    if path.is_file():
        if not path.name.endswith(SUFFIXES):
            raise ValueError(f"{path}: unsupported data file, expected one of {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no {'/'.join(SUFFIXES)} files under {path}")
    return files


def _read_json(path: Path) -> Iterator[dict]:
    """A JSON array (or an object holding one) or JSON lines, whatever the suffix says."""
    if path.suffix == ".json":
        with open(path, encoding="utf-8") as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError:
                data = None  # JSON lines saved as .json (what datasets' to_json writes)
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}, else one row
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        if data is not None:
            yield from data
            return
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None


def _read_parquet(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        yield from batch.to_pylist()


def read_rows(path: str | Path) -> Iterator[dict]:
    """Rows of every data file at ``path`` (file or folder), in sorted file order."""
    for f in _data_files(Path(path).expanduser()):
        yield from (_read_parquet(f) if f.suffix == ".parquet" else _read_json(f))


def hub_rows(hub_id: str | None, split: str) -> Iterable[dict]:
    """Rows of a hub data set, only when the hub is reachable; otherwise a clear error."""
    from stackllama.models.resolve import hub_reachable

    if not hub_id:
        raise ValueError("no data.path and no data.hub_id: pass data.path= a local .jsonl/.json/.parquet copy")
    if not hub_reachable(HUB_TIMEOUT):
        raise RuntimeError(
            f"the Hugging Face hub is not reachable (or HF_HUB_OFFLINE is set), so {hub_id} cannot be "
            f"downloaded: pass data.path= a local .jsonl/.json/.parquet copy (file or folder)"
        )
    import datasets

    log.info("loading %s (split %s) from the hub", hub_id, split)
    return datasets.load_dataset(hub_id, split=split)


def _rows(data_cfg: Any) -> Iterable[dict]:
    if data_cfg.path:
        return read_rows(data_cfg.path)
    return hub_rows(data_cfg.hub_id, data_cfg.hub_split)


def _metadata(value: Any) -> dict:
    if isinstance(value, dict):
        return dict(value)
    if value is None:
        return {}
    return {"value": value}


# --------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------


H4_COLUMNS = ("qid", "question", "answers")
PAIRED_COLUMNS = ("qid", "question", "response_j", "response_k")


def _missing_columns(row: Any, columns: Iterable[str], counts: dict[str, int]) -> bool:
    """Count the required ``columns`` absent or empty in ``row``; True when any is."""
    if not isinstance(row, dict):
        row = {}
    missing = [c for c in columns if row.get(c) is None or (isinstance(row.get(c), str) and not row[c].strip())]
    for c in missing:
        counts[c] = counts.get(c, 0) + 1
    return bool(missing)


def _note_missing(stats: dict[str, Any], counts: dict[str, int]) -> None:
    """``data/missing_columns``: which required columns malformed rows lacked, e.g. ``question (200 rows)``."""
    if counts:
        stats["data/missing_columns"] = ", ".join(f"{c} ({n} rows)" for c, n in counts.items())


def h4_records(rows: Iterable[dict], source: str = "h4_preferences") -> tuple[list[dict], dict[str, Any]]:
    """Normalize rows already in the H4 layout (``qid, question, answers, ...``)."""
    stats: dict[str, Any] = {"data/rows": 0, "data/skipped_malformed_rows": 0, "data/skipped_empty_answers": 0}
    missing: dict[str, int] = {}
    records = []
    for row in rows:
        bump(stats, "data/rows")
        if _missing_columns(row, H4_COLUMNS, missing):
            bump(stats, "data/skipped_malformed_rows")
            continue
        question = (row.get("question") or "").strip()
        answers = row.get("answers")
        if not isinstance(answers, list):
            missing["answers (not a list)"] = missing.get("answers (not a list)", 0) + 1
            bump(stats, "data/skipped_malformed_rows")
            continue
        kept = []
        for i, ans in enumerate(answers):
            text = (ans.get("text") or "").strip() if isinstance(ans, dict) else ""
            if not text:
                bump(stats, "data/skipped_empty_answers")
                continue
            try:
                pm = int(ans["pm_score"])
            except (KeyError, TypeError, ValueError):
                bump(stats, "data/skipped_malformed_answers")
                continue
            score = ans.get("score")
            kept.append(
                {
                    "answer_id": str(ans.get("answer_id", f"{row['qid']}-{i}")),
                    "pm_score": pm,
                    "selected": bool(ans.get("selected", False)),
                    "text": text,
                    "score": int(score) if isinstance(score, (int, float)) else pm,
                }
            )
        records.append(
            {
                "qid": str(row["qid"]),
                "question": question,
                "answers": kept,
                "date": str(row.get("date") or ""),
                "metadata": {**_metadata(row.get("metadata")), "source": source},
            }
        )
    _note_missing(stats, missing)
    return records, stats


def paired_records(rows: Iterable[dict]) -> tuple[list[dict], dict[str, Any]]:
    """Group (question, response_j > response_k) rows by qid into records (see module doc)."""
    stats: dict[str, Any] = {"data/rows": 0, "data/skipped_malformed_rows": 0, "data/paired_rows": 0}
    missing: dict[str, int] = {}
    groups: dict[str, dict] = {}
    for row in rows:
        bump(stats, "data/rows")
        if _missing_columns(row, PAIRED_COLUMNS, missing):
            bump(stats, "data/skipped_malformed_rows")
            continue
        qid, question = row.get("qid"), (row.get("question") or "").strip()
        better, worse = (row.get("response_j") or "").strip(), (row.get("response_k") or "").strip()
        if better == worse:
            bump(stats, "data/skipped_malformed_rows")
            bump(stats, "data/skipped_identical_pairs")
            continue
        bump(stats, "data/paired_rows")
        g = groups.setdefault(
            str(qid),
            {
                "question": question,
                "date": str(row.get("date") or ""),
                "metadata": _metadata(row.get("metadata")),
                "texts": [],
                "beats": {},
            },
        )
        for text in (better, worse):
            if text not in g["beats"]:
                g["texts"].append(text)
                g["beats"][text] = set()
        g["beats"][better].add(worse)
    records = []
    for qid, g in groups.items():
        answers = [
            {
                "answer_id": f"{qid}-{i}",
                "pm_score": len(g["beats"][t]),
                "selected": False,
                "text": t,
                "score": len(g["beats"][t]),
            }
            for i, t in enumerate(g["texts"])
        ]
        records.append(
            {
                "qid": qid,
                "question": g["question"],
                "answers": answers,
                "date": g["date"],
                "metadata": {**g["metadata"], "source": "paired"},
            }
        )
    _note_missing(stats, missing)
    return records, stats


def load_h4_preferences(data_cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    records, stats = h4_records(_rows(data_cfg))
    count_records(records, stats)
    log_stats(stats, f"h4_preferences from {data_cfg.path or data_cfg.hub_id}")
    return records, stats


def load_paired(data_cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    records, stats = paired_records(_rows(data_cfg))
    count_records(records, stats)
    log_stats(stats, f"paired from {data_cfg.path or data_cfg.hub_id}")
    return records, stats
