"""Training batches for the reward model: question-grouped pairs, each distinct text forwarded once.

TRL's ``RewardTrainer`` stacks every pair's chosen and rejected text into the batch, so an
answer that takes part in k pairs (a question with n ranked answers gives up to n(n-1)/2
pairs) is run through the model k times per epoch. On the synthetic reward split that is
1511 pairs over 1199 distinct texts: 3022 forwards where 1199 suffice. Nothing in TRL,
transformers or peft shares those forwards, so this module does, with two small pieces:

* ``GroupedPairSampler`` orders pairs so that the pairs of one question are consecutive
  (batches are still ``batch_size`` pairs), groups sorted by length with random ties and
  the batches shuffled each epoch (similar lengths share a batch: less padding on CPU);
* ``DedupPreferenceCollator`` pads only the distinct token sequences of a batch and adds
  ``pair_index``: for TRL's layout (all chosen rows, then all rejected rows) the row of the
  distinct sequence each one is.

``grouped_reward_trainer`` then expands the model's outputs with ``pair_index`` before
TRL's own ``compute_loss`` reads them, so the loss (``-log sigmoid(r_chosen -
r_rejected)``, mean over the batch's pairs), its margin/centering options and TRL's
logged metrics are exactly TRL's for the same pairs; only the forwards are fewer. With one
pair per group and no repeated text, batches equal the plain length-bucketed ones.
"""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from stackllama.models.padding import pad


class GroupedPairSampler(torch.utils.data.Sampler):
    """Pair indices, a group's pairs consecutive, groups of similar length in shuffled batches.

    ``groups``: lists of pair indices (each pair in exactly one); ``lengths``: one length per
    group (its longest text). Each epoch the groups are sorted by length (random ties), the
    flattened stream is cut into ``batch_size`` pairs and those batches are shuffled; a
    short last batch stays last, because the DataLoader cuts the stream every
    ``batch_size`` indices.
    """

    def __init__(self, groups: Sequence[Sequence[int]], lengths: Sequence[int], batch_size: int, seed: int):
        if len(groups) != len(lengths):
            raise ValueError(f"{len(groups)} groups but {len(lengths)} lengths")
        self.groups = [list(g) for g in groups]
        self.lengths = list(lengths)
        self.batch_size = max(1, int(batch_size))
        self.seed = int(seed)
        self.epoch = 0
        self.size = sum(len(g) for g in self.groups)

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        rng = random.Random(f"{self.seed}-buckets-{self.epoch}")
        self.epoch += 1
        order = sorted(range(len(self.groups)), key=lambda i: (self.lengths[i], rng.random()))
        stream = [pair for i in order for pair in self.groups[i]]
        batches = [stream[i : i + self.batch_size] for i in range(0, len(stream), self.batch_size)]
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        rng.shuffle(batches)
        batches += tail
        for batch in batches:
            yield from batch


def dedup_pairs(chosen: Sequence[Sequence[int]], rejected: Sequence[Sequence[int]]):
    """``(distinct sequences, pair_index)``: ``distinct[pair_index[k]]`` is row k of ``chosen + rejected``."""
    rows: dict[tuple[int, ...], int] = {}
    index = []
    for seq in list(chosen) + list(rejected):
        key = tuple(int(t) for t in seq)
        index.append(rows.setdefault(key, len(rows)))
    return [list(k) for k in rows], index


class DedupPreferenceCollator:
    """Like TRL's ``DataCollatorForPreference`` (right padding, same keys), distinct texts only.

    Returns ``input_ids``/``attention_mask`` of shape ``[U, T]`` for the U distinct sequences
    and ``pair_index`` ``[2P]`` (chosen rows then rejected rows, TRL's order); ``margin``
    passes through as in TRL.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        distinct, index = dedup_pairs([e["chosen_ids"] for e in examples], [e["rejected_ids"] for e in examples])
        input_ids, attention_mask = pad(distinct, self.pad_token_id)  # [U, T] each
        out = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pair_index": torch.tensor(index, dtype=torch.long),
        }  # [2P]
        if "margin" in examples[0]:
            out["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float)
        return out


def length_chunks(lengths: Sequence[int], chunk_size: int | None) -> list[list[int]]:
    """Row indices sorted by length, cut every ``chunk_size`` (None: one chunk of all rows)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    size = len(order) if not chunk_size else max(1, int(chunk_size))
    return [order[i : i + size] for i in range(0, len(order), size)] if order else []


class _ExpandedModel:
    """Runs the model on a batch's distinct texts and returns logits in TRL's pair layout.

    A question's answers differ in length, so one padded forward over them wastes much of
    its compute (37% of the tokens on the synthetic reward split, batches of 8 pairs).
    With ``chunk_size`` the distinct rows go through the model in length-sorted chunks,
    each trimmed to its own longest row (padding 10-15% with 4 rows a chunk); one backward
    still covers them all. On a GPU one wide forward (None) is usually faster.
    """

    def __init__(self, model: Any, pair_index: torch.Tensor, chunk_size: int | None = None):
        self.model, self.pair_index, self.chunk_size = model, pair_index, chunk_size

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        lengths = attention_mask.sum(-1).tolist()  # right padding: the real length of each row
        chunks = length_chunks(lengths, self.chunk_size)
        if len(chunks) <= 1:
            outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            outputs.logits = outputs.logits[self.pair_index]  # [U, 1] -> [2P, 1]
            return outputs
        logits = []
        for rows in chunks:
            rows_t = torch.tensor(rows, device=input_ids.device)
            width = int(max(lengths[r] for r in rows))
            outputs = self.model(
                input_ids=input_ids[rows_t, :width], attention_mask=attention_mask[rows_t, :width], **kwargs
            )
            logits.append(outputs.logits)  # [C, 1]
        position = torch.empty(len(lengths), dtype=torch.long, device=input_ids.device)
        position[[r for rows in chunks for r in rows]] = torch.arange(len(lengths), device=input_ids.device)
        outputs.logits = torch.cat(logits)[position[self.pair_index]]  # chunked [U, 1] -> [2P, 1]
        return outputs


def grouped_reward_trainer(pair_groups: list[list[int]], group_lengths: list[int], chunk_size: int | None = None):
    """TRL's ``RewardTrainer`` with grouped, length-bucketed batches and deduplicated forwards.

    Batches come from ``GroupedPairSampler`` (one pair per group gives plain length buckets);
    a batch from the ``DedupPreferenceCollator`` is forwarded in length-sorted chunks of
    ``chunk_size`` rows, one from TRL's own collator as TRL forwards it.
    """
    from trl import RewardTrainer

    class GroupedRewardTrainer(RewardTrainer):
        def _get_train_sampler(self, train_dataset=None):
            return GroupedPairSampler(pair_groups, group_lengths, self.args.per_device_train_batch_size, self.args.seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            pair_index = inputs.pop("pair_index", None)
            if pair_index is not None:
                model = _ExpandedModel(model, pair_index, chunk_size)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return GroupedRewardTrainer


__all__ = ["DedupPreferenceCollator", "GroupedPairSampler", "dedup_pairs", "grouped_reward_trainer", "length_chunks"]
