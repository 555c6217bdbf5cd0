"""The RL split's prompts as PPO draws them: tokenized once, in a seeded order that resumes exactly."""

from __future__ import annotations

import logging
import random
from typing import Any, Sequence

log = logging.getLogger(__name__)


def eval_questions(questions: Sequence[str], n: int) -> list[str]:
    """The first ``n`` distinct questions, in split order (pairs repeat their question)."""
    seen: dict[str, None] = {}
    for q in questions:
        if q not in seen:
            seen[q] = None
    return list(seen)[: max(int(n), 0)]


class PromptSource:
    """RL-split prompts, tokenized once; too-long prompts skipped and counted.

    Yields batches by walking a seeded permutation epoch after epoch; its position is part
    of the checkpoint so a resumed run sees the same prompts it would have.
    """

    def __init__(self, questions: list[str], queries: list[str], tokenizer: Any, max_prompt_length: int, seed: int):
        self.questions: list[str] = []
        self.query_ids: list[list[int]] = []
        self.skipped_too_long = 0
        for question, query in zip(questions, queries):
            ids = tokenizer(query, add_special_tokens=False)["input_ids"]
            if len(ids) > max_prompt_length:
                self.skipped_too_long += 1
                continue
            self.questions.append(question)
            self.query_ids.append(ids)
        if not self.query_ids:
            raise ValueError(
                f"no RL prompt fits ppo.max_prompt_length={max_prompt_length} "
                f"({self.skipped_too_long} skipped); raise the limit"
            )
        if self.skipped_too_long:
            log.info("Skipped %d RL prompts longer than %d tokens", self.skipped_too_long, max_prompt_length)
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation()

    def _permutation(self) -> list[int]:
        order = list(range(len(self.query_ids)))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[int]:
        picked = []
        while len(picked) < n:
            if self.cursor >= len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation()
            picked.append(self._order[self.cursor])
            self.cursor += 1
        return picked

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation()


__all__ = ["PromptSource", "eval_questions"]
