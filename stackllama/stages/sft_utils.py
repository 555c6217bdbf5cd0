"""Helpers of the SFT stage: held-out split, perplexity, batch accounting, merging, samples.

Kept apart from ``stackllama.stages.sft`` so the stage reads as the recipe (load, measure,
train, merge, sample) and these pieces can be tested and reused (the bench uses the
collator counter; later stages can reuse ``perplexity`` and ``generate_responses``).
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from stackllama.models.padding import pad

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data


def hold_out_questions(dataset: Any, eval_size: int, seed: int, fraction: float | None = None) -> tuple[Any, Any]:
    """Split a finetune ``datasets.Dataset`` into (train, held-out) texts, by whole questions.

    A question often has several winning answers (several texts); holding out texts one by
    one would put the same question on both sides and flatter the held-out perplexity. So
    questions are shuffled with ``seed`` and taken until ``eval_size`` texts are held out (the
    remaining answers of the last question taken are dropped from both sides) or, with
    ``fraction``, until that fraction of the questions (rounded up) is taken. At least one
    question is always left to train on, so a small data set holds out less rather than
    everything; with fewer than two questions nothing is held out.
    """
    questions = sorted(set(dataset["question"]))  # sorted: independent of row order
    if eval_size <= 0 or len(questions) < 2 or (fraction is not None and fraction <= 0):
        return dataset, dataset.select([])
    random.Random(f"{seed}-sft-holdout").shuffle(questions)
    max_questions = len(questions) - 1
    if fraction is not None:
        max_questions = min(max_questions, max(1, math.ceil(fraction * len(questions))))
    rows_of: dict[str, list[int]] = {}
    for i, q in enumerate(dataset["question"]):
        rows_of.setdefault(q, []).append(i)
    held: list[int] = []
    taken: set[str] = set()
    for q in questions:
        if len(held) >= eval_size or len(taken) >= max_questions:
            break
        taken.add(q)
        held.extend(rows_of[q][: eval_size - len(held)])
    train = [i for i, q in enumerate(dataset["question"]) if q not in taken]
    return dataset.select(train), dataset.select(held)


def cap_texts(dataset: Any, max_texts: int | None, seed: int) -> Any:
    """``max_texts`` rows drawn with ``seed`` (rows come grouped by question), or all when None."""
    if max_texts is None or max_texts >= len(dataset):
        return dataset
    return dataset.shuffle(seed=seed).select(range(int(max_texts)))


# --------------------------------------------------------------------------- perplexity


def _encode_for_eval(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of each text as training sees them (text + EOS), truncated to ``max_length``."""
    eos = tokenizer.eos_token or ""
    ids = tokenizer([t if t.endswith(eos) else t + eos for t in texts], add_special_tokens=True)["input_ids"]
    return [x[:max_length] for x in ids]


@torch.no_grad()
def token_nll(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int, device: Any
) -> tuple[float, int]:
    """Summed next-token NLL and the number of predicted tokens over ``texts``.

    Each text is scored on its own (no packing across texts), truncated to ``max_length``;
    batches are right-padded so the real tokens keep positions 0..n-1 exactly as in an
    unpadded forward, and pad positions are masked out of both the attention and the sum.
    """
    was_training = model.training
    model.eval()
    encoded = _encode_for_eval(tokenizer, texts, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total_nll, total_tokens = 0.0, 0
    try:
        for start in range(0, len(encoded), max(1, batch_size)):
            chunk = encoded[start : start + batch_size]
            ids, mask = pad(chunk, pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = ids[:, 1:].to(logp.device)
            keep = mask[:, 1:].to(logp.device).bool()
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            total_nll += float(nll[keep].sum())
            total_tokens += int(keep.sum())
    finally:
        model.train(was_training)
    return total_nll, total_tokens


def perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], max_length: int, batch_size: int, device: Any
) -> float:
    """Token-weighted perplexity, exp(sum NLL / predicted tokens), over ``texts``."""
    if not texts:
        return float("nan")
    nll, n = token_nll(model, tokenizer, texts, max_length, batch_size, device)
    return math.exp(nll / max(n, 1))


# --------------------------------------------------------------------------- batch accounting


class TokenCountingCollator:
    """Wraps a data collator and counts the real and total token slots of every batch it builds.

    The padding fraction is measured on what the model is actually fed. Padded batches carry
    an ``attention_mask`` (0 = pad). Packed batches carry none (``position_ids`` restart at
    each text instead): their real tokens are the examples' own (each example is one packed
    bin), every other slot is padding: none in TRL's single flattened row, the few at the end
    of the shorter bins with ``PackedRowsCollator``.
    """

    def __init__(self, collator: Callable[[list], dict] | None):
        self.collator = collator
        self.real_tokens = 0
        self.total_tokens = 0
        self.batches = 0

    def __call__(self, examples: list) -> dict:
        batch = self.collator(examples)
        total = int(batch["input_ids"].numel())
        mask = batch.get("attention_mask")
        if mask is not None:
            real = int(mask.sum())
        elif examples and all("input_ids" in ex for ex in examples):
            real = sum(len(ex["input_ids"]) for ex in examples)
        else:
            real = total
        self.real_tokens += real
        self.total_tokens += total
        self.batches += 1
        return batch

    @property
    def padding_fraction(self) -> float:
        return 1.0 - self.real_tokens / self.total_tokens if self.total_tokens else 0.0


class PackedRowsCollator:
    """Packed bins as rows of one batch: (bins, longest bin), ``position_ids`` restarting at each text.

    TRL's padding-free collator concatenates a batch's bins into ONE row (1, bins x seq_length)
    for the varlen kernels of flash attention. Without them (SDPA, eager: every CPU run)
    transformers builds a block-causal mask over that whole row, so attention costs
    (bins x L)^2 instead of bins x L^2 and runs on a dense mask: packing then lost to padding
    (0.95-1.0x real tokens/s with 34% padding removed, bench_sft.py). Kept as rows, the same
    documents are separated the same way (transformers derives the per-row block mask from the
    position ids: no attention_mask is passed, or it would not) at per-bin cost. The loss is
    the same: labels are -100 at each text's first token (nothing predicts it from the previous
    text) and on the padding after shorter bins. Written by hand: TRL has no such mode.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        ids = [list(ex["input_ids"]) for ex in examples]  # one packed bin each
        lengths = [list(ex.get("seq_lengths") or [len(x)]) for ex, x in zip(examples, ids)]  # its texts' lengths
        positions = [[p for n in seq for p in range(n)] for seq in lengths]  # restart at each text
        for x, pos in zip(ids, positions):
            if len(pos) != len(x):
                raise ValueError(f"packed bin of {len(x)} tokens with seq_lengths summing to {len(pos)}")
        labels = [[tok if p > 0 else -100 for tok, p in zip(x, pos)] for x, pos in zip(ids, positions)]
        input_ids, _ = pad(ids, self.pad_token_id, side="right")
        labels_t, _ = pad(labels, -100, side="right")
        position_ids, _ = pad(positions, 0, side="right")
        return {"input_ids": input_ids, "labels": labels_t, "position_ids": position_ids}


# --------------------------------------------------------------------------- parameters


def cast_trainable(model: Any, dtype: torch.dtype) -> None:
    """Cast the trainable (adapter) parameters to ``dtype``.

    TRL's SFTTrainer casts LoRA weights of k-bit models to bfloat16 (the QLoRA paper's GPU
    recipe). On CPU with float32 compute that makes the adapter matmuls slow and, worse,
    rounds away AdamW updates smaller than bfloat16's ~0.4% resolution, so we put the
    adapters back in ``quantization.compute_dtype`` before the optimizer is built.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def trainable_fingerprint(model: Any) -> float:
    """Sum of the trainable parameters' norms: moves whenever an optimizer step lands."""
    with torch.no_grad():
        return float(sum(p.float().norm() for p in model.parameters() if p.requires_grad))


# --------------------------------------------------------------------------- samples


@torch.no_grad()
def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, device: Any, batch_size: int = 8
) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded), decoded without special tokens.

    Greedy keeps the samples reproducible run to run, so two runs' tables can be compared.
    """
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues from the last column
    out: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(list(prompts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            gen = model.generate(
                **enc,
                max_new_tokens=int(max_new_tokens),
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1] :]
            out.extend(t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def samples_markdown(title: str, rows: Sequence[tuple[str, str]]) -> str:
    """A readable Markdown page of (question, response) pairs."""
    parts = [f"# {title}\n"]
    for i, (question, response) in enumerate(rows, 1):
        parts.append(f"## Sample {i}\n\n**Question**\n\n{question}\n\n**Response**\n\n{response or '_(empty)_'}\n")
    return "\n".join(parts)


def read_checkpoint_step(checkpoint: str | Path) -> int:
    """``global_step`` recorded in a Trainer checkpoint's trainer_state.json."""
    return int(json.loads((Path(checkpoint) / "trainer_state.json").read_text())["global_step"])
