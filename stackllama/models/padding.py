"""One padding helper for every batch of token-id lists (rollouts, reward scoring, RM training, perplexity)."""

from __future__ import annotations

from typing import Sequence

import torch


def pad(seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (B, longest): each row's ids on ``side``'s opposite end
    (``right``: ids first, padding after; ``left``: padding first, as generation wants)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}; choose left or right")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        n = len(seq)
        cols = slice(0, n) if side == "right" else slice(width - n, width)
        ids[i, cols] = torch.tensor(list(seq), dtype=torch.long)
        mask[i, cols] = 1
    return ids, mask


__all__ = ["pad"]
