"""Best-of-n: the analytic KL, the selection, and the figures on a hand-made score table."""

from __future__ import annotations

import math

import pytest
import torch

from stackllama.stages.best_of_n import bon_kl, frontier, select


def test_best_of_n_kl_is_log_n_minus_n_minus_one_over_n():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    ks = [bon_kl(n) for n in (1, 2, 4, 8, 16)]
    assert ks == sorted(ks)  # more samples, further from the policy
    with pytest.raises(ValueError):
        bon_kl(0)


def test_the_rm_s_favourite_of_the_first_n_is_kept_and_scored_by_gold():
    rm = torch.tensor([[0.0, 2.0, 1.0, 5.0], [3.0, 1.0, 4.0, 0.0]])  # 2 questions x 4 samples
    gold = torch.tensor([[1.0, 0.0, 9.0, -2.0], [0.5, 7.0, 1.5, 3.0]])
    assert select(rm, 1).tolist() == [0, 0] and select(rm, 2).tolist() == [1, 0] and select(rm, 4).tolist() == [3, 2]
    out = frontier(rm, gold, [1, 2, 4])
    assert out["eval/bon/1/reward_mean"] == pytest.approx(1.5) and out["eval/bon/1/gold_mean"] == pytest.approx(0.75)
    assert out["eval/bon/2/reward_mean"] == pytest.approx(2.5) and out["eval/bon/2/gold_mean"] == pytest.approx(0.25)
    # the RM's favourite of 4 is gold's worst on question 1: over-optimization in miniature
    assert out["eval/bon/4/reward_mean"] == pytest.approx(4.5) and out["eval/bon/4/gold_mean"] == pytest.approx(-0.25)
    assert out["eval/bon/4/kl"] == pytest.approx(bon_kl(4))
    with pytest.raises(ValueError, match="best-of-5 from 4"):
        select(rm, 5)
