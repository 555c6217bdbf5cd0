"""Tests for stackllama.ppo.core (pure torch, CPU, no models)."""

import math

import pytest
import torch

from stackllama.ppo import core
from stackllama.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    LengthSampler,
    compute_gae,
    compute_rewards,
    entropy_from_logits,
    explained_variance,
    kl_estimate,
    logprobs_from_hidden,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    repetition_stats,
    value_loss,
)

# --------------------------------------------------------------------------------------
# GAE
# --------------------------------------------------------------------------------------


def test_gae_hand_worked_example_with_padding():
    # gamma = 1, lam = 0.95, T = 3.
    # Row 0 (no padding): r = [0, 0, 1], V = [0.5, 0.2, 0.4]
    #   t=2: delta = 1 + 0 - 0.4        = 0.6    A2 = 0.6
    #   t=1: delta = 0 + 0.4 - 0.2      = 0.2    A1 = 0.2 + 0.95*0.6   = 0.77
    #   t=0: delta = 0 + 0.2 - 0.5      = -0.3   A0 = -0.3 + 0.95*0.77 = 0.4315
    #   returns = A + V = [0.9315, 0.97, 1.0]
    # Row 1 (last token is padding, holding garbage r=99, V=77): r = [0, 1, *], V = [0.5, 0.2, *]
    #   t=1: delta = 1 + 0 - 0.2        = 0.8    A1 = 0.8     (terminal: V_2 ignored)
    #   t=0: delta = 0 + 0.2 - 0.5      = -0.3   A0 = -0.3 + 0.95*0.8 = 0.46
    #   returns = [0.96, 1.0, 0 (masked)]
    values = torch.tensor([[0.5, 0.2, 0.4], [0.5, 0.2, 77.0]])
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = compute_gae(values, rewards, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.4315, 0.77, 0.6], [0.46, 0.8, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.9315, 0.97, 1.0], [0.96, 1.0, 0.0]]))

    # The padded row equals the unpadded computation on its first two tokens.
    adv2, ret2 = compute_gae(values[1:, :2], rewards[1:, :2], torch.ones(1, 2), gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv[1:, :2], adv2)
    torch.testing.assert_close(ret[1:, :2], ret2)


def test_gae_discount_and_left_padding():
    # gamma = 0.5, lam = 1 -> A_t = sum_k gamma^k r_{t+k} - V_t (Monte-Carlo), with V = 0:
    # r = [1, 2, 4] -> A = [1 + 0.5*2 + 0.25*4, 2 + 0.5*4, 4] = [3, 4, 4]
    rewards = torch.tensor([[1.0, 2.0, 4.0], [-5.0, 1.0, 2.0]])
    values = torch.tensor([[0.0, 0.0, 0.0], [9.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])  # row 1 left-padded
    adv, ret = compute_gae(values, rewards, mask, gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[3.0, 4.0, 4.0], [0.0, 2.0, 2.0]]))
    torch.testing.assert_close(ret, adv)  # V = 0 at real positions


# --------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------


def test_adaptive_kl_controller_matches_formula_and_clips():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # error = 6.6/6 - 1 = 0.1 -> mult = 1 + 0.1 * 256 / 10000 = 1.00256
    ctl.update(current_kl=6.6, n_steps=256)
    assert ctl.value == pytest.approx(0.2 * 1.00256)
    # error = 100/6 - 1 = 15.67 -> clipped to 0.2 -> mult = 1 + 0.2 * 1000 / 10000 = 1.02
    v = ctl.value
    ctl.update(current_kl=100.0, n_steps=1000)
    assert ctl.value == pytest.approx(v * 1.02)
    # error = 0/6 - 1 = -1 -> clipped to -0.2 -> mult = 0.98
    v = ctl.value
    ctl.update(current_kl=0.0, n_steps=1000)
    assert ctl.value == pytest.approx(v * 0.98)
    # checkpoint round-trip
    restored = AdaptiveKLController(init_kl_coef=1.0, target=1.0, horizon=1.0)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    assert all(isinstance(x, float) for x in ctl.state_dict().values())


def test_fixed_kl_controller_stays_fixed():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 6.0, 1000.0):
        ctl.update(kl, 256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


# --------------------------------------------------------------------------------------
# Rewards and KL estimators
# --------------------------------------------------------------------------------------


def test_compute_rewards_score_on_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, -4.0], [-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, -2.0, -9.0], [-2.0, -2.0, -2.0, -2.0], [-0.5, -0.5, -0.5, -0.5]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 0, 0]])  # right pad, left pad, 1 token
    scores = torch.tensor([10.0, 20.0, 30.0])
    rewards, kl = compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k1")
    # k1 = logp - logp_ref, zero where masked
    torch.testing.assert_close(kl, torch.tensor([[0.5, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    expected = torch.tensor(
        [
            [-0.05, 0.0, 0.1 + 10.0, 0.0],  # last real token is index 2
            [0.0, -0.1, -0.1, -0.1 + 20.0],  # last real token is index 3
            [30.0, 0.0, 0.0, 0.0],  # last real token is index 0
        ]
    )
    torch.testing.assert_close(rewards, expected)
    assert (rewards[mask == 0] == 0).all()


def test_kl_estimators():
    logp = torch.randn(4, 7)
    ref = torch.randn(4, 7)
    assert torch.equal(kl_estimate(logp, logp.clone(), "k1"), torch.zeros(4, 7))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), 0.5 * (logp - ref) ** 2)
    torch.testing.assert_close(kl_estimate(logp, ref, "abs"), (logp - ref).abs())
    r = torch.exp(ref - logp)
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), (r - 1) - torch.log(r))
    big = kl_estimate(torch.randn(1000) * 5, torch.randn(1000) * 5, "k3")
    assert (big >= 0).all()
    with pytest.raises(ValueError, match="k1.*k2.*k3.*abs"):
        kl_estimate(logp, ref, "k4")


# --------------------------------------------------------------------------------------
# Masking: garbage at masked positions changes nothing
# --------------------------------------------------------------------------------------


def _batch(seed=0, B=3, T=5):
    g = torch.Generator().manual_seed(seed)
    t = lambda: torch.randn(B, T, generator=g)  # noqa: E731
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
    return dict(lp=t(), old=t(), ref=t(), adv=t(), v=t(), old_v=t(), ret=t(), r=t(), mask=mask)


def _all_outputs(b):
    m = b["mask"]
    out = {}
    rewards, kl = compute_rewards(torch.tensor([1.0, 2.0, 3.0]), b["lp"], b["ref"], m, 0.1, "k3")
    out["rewards"], out["kl"] = rewards, kl
    out["adv"], out["ret"] = compute_gae(b["v"], b["r"], m, gamma=0.99, lam=0.95)
    loss, stats = policy_loss(b["lp"], b["old"], b["adv"], m, cliprange=0.2)
    out["pg_loss"] = loss
    out.update({f"pg_{k}": v for k, v in stats.items()})
    loss, stats = value_loss(b["v"], b["old_v"], b["ret"], m, cliprange_value=0.2)
    out["vf_loss"] = loss
    out.update({f"vf_{k}": v for k, v in stats.items()})
    out["mean"] = masked_mean(b["lp"], m)
    out["mean_dim"] = masked_mean(b["lp"], m, dim=1)
    out["var"] = masked_var(b["lp"], m)
    out["whiten"] = masked_whiten(b["adv"], m)
    out["ev"] = explained_variance(b["v"], b["ret"], m)
    return out


def test_masked_positions_do_not_change_any_output():
    clean = _batch()
    dirty = {k: v.clone() for k, v in clean.items()}
    pad = clean["mask"] == 0
    for k in ("lp", "old", "ref", "adv", "v", "old_v", "ret", "r"):
        dirty[k][pad] = 1e4 * torch.randn(int(pad.sum()))  # huge garbage at padding
    dirty["lp"][1, 3], dirty["lp"][1, 4] = float("inf"), float("nan")  # must not leak either
    a, b = _all_outputs(clean), _all_outputs(dirty)
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=f"{k} changed by masked garbage")
        assert torch.isfinite(a[k]).all(), k

    # gradients at real positions are identical and zero at padding
    def grads(batch):
        lp = batch["lp"].clone().requires_grad_(True)
        v = batch["v"].clone().requires_grad_(True)
        pl, _ = policy_loss(lp, batch["old"], batch["adv"], batch["mask"], 0.2)
        vl, _ = value_loss(v, batch["old_v"], batch["ret"], batch["mask"], 0.2)
        (pl + vl).backward()
        return lp.grad, v.grad

    (g1, h1), (g2, h2) = grads(clean), grads(dirty)
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(h1, h2)
    assert (g1[pad] == 0).all() and (h1[pad] == 0).all()
    assert g1[~pad].abs().sum() > 0


# --------------------------------------------------------------------------------------
# Policy / value losses
# --------------------------------------------------------------------------------------


def test_policy_loss_ratio_one_is_plain_surrogate():
    lp = torch.randn(2, 4)
    adv = torch.randn(2, 4)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, stats = policy_loss(lp, lp.clone(), adv, mask, cliprange=0.2)
    # ratio == 1 -> loss = -E_m[A]
    expected = -(adv * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    assert stats["clipfrac"].item() == 0.0
    assert stats["approxkl"].item() == 0.0 and stats["policykl"].item() == 0.0
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["ratio_max"].item() == pytest.approx(1.0)
    assert all(s.dim() == 0 and not s.requires_grad for s in stats.values())


def test_policy_loss_clipping():
    # one token, A = +1, ratio = e^0.5 ~ 1.65 > 1.2 -> clipped term wins: loss = -1.2
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.5, 123.0]])  # second token masked
    adv = torch.tensor([[1.0, 1.0]])
    mask = torch.tensor([[1, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert stats["clipfrac"].item() == 1.0
    assert stats["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert stats["approxkl"].item() == pytest.approx(0.5 * 0.25)
    assert stats["policykl"].item() == pytest.approx(-0.5)
    # A = -1 with ratio > 1+eps: unclipped term (-A*ratio = 1.65) is the max -> no clip counted
    loss, stats = policy_loss(lp, old, -adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx(math.exp(0.5))
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipping():
    # V_old = 0, V = 1, R = 1, c = 0.2 -> V_clip = 0.2
    # unclipped (1-1)^2 = 0, clipped (0.2-1)^2 = 0.64 -> loss = 0.5 * 0.64 = 0.32, clipfrac = 1
    v, old_v, ret = torch.ones(1, 1), torch.zeros(1, 1), torch.ones(1, 1)
    loss, stats = value_loss(v, old_v, ret, torch.ones(1, 1), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.32)
    assert stats["clipfrac"].item() == 1.0
    assert stats["error"].item() == pytest.approx(0.0)
    # inside the clip range: loss = 0.5 * (V - R)^2
    loss, stats = value_loss(torch.full((1, 1), 0.1), old_v, ret, torch.ones(1, 1), cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81)
    assert stats["clipfrac"].item() == 0.0
    assert stats["error"].item() == pytest.approx(0.81)


# --------------------------------------------------------------------------------------
# Logit helpers
# --------------------------------------------------------------------------------------


def test_entropy_uniform_and_peaked():
    V = 50
    ent = entropy_from_logits(torch.full((2, 3, V), 7.0))
    torch.testing.assert_close(ent, torch.full((2, 3), math.log(V)))
    logits = torch.randn(2, 3, V) * 3
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(p * torch.log(p)).sum(-1))
    # large logits and -inf entries stay finite; a one-hot distribution has entropy 0
    peaked = torch.full((1, 1, V), float("-inf"))
    peaked[..., 3] = 1e4
    assert entropy_from_logits(peaked).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_matches_log_softmax(dtype):
    logits = (torch.randn(3, 6, 40) * 4).to(dtype)
    labels = torch.randint(0, 40, (3, 6))
    ref = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    out = logprobs_from_logits(logits, labels)
    assert out.shape == (3, 6)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_logprobs_from_hidden_matches_full_logits_with_gradients(chunk, monkeypatch):
    """Chunked + checkpointed head = the plain (B, T, V) computation, values and gradients."""
    from stackllama.ppo import core as core_module

    monkeypatch.setattr(core_module, "TOKEN_CHUNK", 1)  # tiles of chunk x T tokens: several of them
    torch.manual_seed(0)
    B, T, H, V = 5, 4, 8, 50
    head = torch.nn.Linear(H, V, bias=False)
    hidden = torch.randn(B, T, H, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    weights = torch.randn(B, T)

    full = logprobs_from_logits(head(hidden), labels)
    (full * weights).sum().backward()
    want_h, want_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    got, entropy = logprobs_from_hidden(hidden, head, labels, chunk=chunk)
    assert entropy is None
    (got * weights).sum().backward()
    torch.testing.assert_close(got, full)
    torch.testing.assert_close(hidden.grad, want_h)
    torch.testing.assert_close(head.weight.grad, want_w)

    with torch.no_grad():
        lp, ent = logprobs_from_hidden(hidden, head, labels, chunk=chunk, with_entropy=True)
        torch.testing.assert_close(lp, full.detach())
        torch.testing.assert_close(ent, entropy_from_logits(head(hidden)))
    with pytest.raises(ValueError, match="no-grad"):
        logprobs_from_hidden(hidden, head, labels, with_entropy=True)


def test_masked_whiten_and_var():
    x = torch.randn(4, 8) * 3 + 5
    mask = torch.ones(4, 8)
    mask[1, 5:] = 0
    mask[3, :2] = 0
    x[mask == 0] = 1e6  # would dominate an unmasked statistic
    m = mask.bool()
    torch.testing.assert_close(masked_var(x, mask), x[m].var())  # unbiased
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), x[m].var(unbiased=False))
    w = masked_whiten(x, mask)
    assert abs(w[m].mean().item()) < 1e-5
    assert w[m].var().item() == pytest.approx(1.0, abs=1e-4)
    assert (w[~m] == 0).all()
    w2 = masked_whiten(x, mask, shift_mean=False)
    assert w2[m].mean().item() == pytest.approx(x[m].mean().item(), rel=1e-5)


def test_explained_variance():
    target = torch.randn(3, 5)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    assert explained_variance(target, target, mask).item() == pytest.approx(1.0)
    # a constant predictor explains nothing
    assert explained_variance(torch.full_like(target, 3.0), target, mask).item() == pytest.approx(0.0, abs=1e-5)


# --------------------------------------------------------------------------------------
# LengthSampler
# --------------------------------------------------------------------------------------


def test_length_sampler_range_and_determinism():
    s = LengthSampler(32, 128, seed=0)
    draws = [s() for _ in range(5000)]
    assert all(isinstance(d, int) for d in draws)
    assert min(draws) == 32 and max(draws) == 127  # [min, max) like TRL
    a, b = LengthSampler(4, 9, seed=123), LengthSampler(4, 9, seed=123)
    assert [a() for _ in range(50)] == [b() for _ in range(50)]  # same seed -> same stream
    c1, c2 = LengthSampler(0, 10**6, seed=1), LengthSampler(0, 10**6, seed=2)
    assert [c1() for _ in range(10)] != [c2() for _ in range(10)]  # different seed -> different
    # checkpoint: a restored sampler continues the exact same stream
    state = a.state_dict()
    expected = [a() for _ in range(20)]
    c = LengthSampler(0, 2, seed=999)
    c.load_state_dict(state)
    assert [c() for _ in range(20)] == expected
    with pytest.raises(ValueError):
        LengthSampler(5, 5)


# --------------------------------------------------------------------------------------
# Reward-hacking monitor
# --------------------------------------------------------------------------------------


def test_repetition_stats_handmade():
    ids = [
        [7, 7, 7, 1],  # 3/4 = 75% one token -> repeat-dominated
        [7, 7, 1, 2],  # 2/4 = 50%, not > 50% -> fine
        [5, 5, 5],  # 100% but only 3 tokens (< 4) -> fine
        [1, 2, 3, 4, 5],  # fine tokens, but fence spam in the text
        torch.tensor([9, 9, 9, 9, 9, 1]),  # tensor input, repeat-dominated AND fence spam
    ]
    texts = [
        "a a a b",
        "```python\nx\n```",  # only 2 fences -> fine
        "ccc",
        "```\n```\n```",  # 3 fences
        "``` ``` ``` ```",
    ]
    s = repetition_stats(ids, texts)
    assert s["frac_repeat_dominated"] == pytest.approx(2 / 5)
    assert s["frac_fence_spam"] == pytest.approx(2 / 5)
    assert s["frac_hacking"] == pytest.approx(3 / 5)
    assert repetition_stats([], []) == {"frac_repeat_dominated": 0.0, "frac_fence_spam": 0.0, "frac_hacking": 0.0}
    with pytest.raises(ValueError):
        repetition_stats([[1]], [])


def test_rloo_and_grpo_advantages_by_hand():
    """Two prompts, k = 2 and k = 4 samples; rewards on the last real token, a padded position."""
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.float)
    rewards = torch.zeros(4, 3)
    rewards[0, 1], rewards[1, 2], rewards[2, 0], rewards[3, 2] = 1.0, 3.0, 2.0, 6.0  # R = 1, 3, 2, 6
    rewards[1, 0] = -0.5  # a per-token KL penalty counts in the total: R_1 = 2.5
    adv, ret = core.compute_rloo(rewards, mask, k=2)
    # pairs (1, 2.5) and (2, 6): A_i = R_i - R_other
    expected = torch.tensor([-1.5, 1.5, -4.0, 4.0])
    torch.testing.assert_close(adv, expected[:, None] * mask)
    torch.testing.assert_close(ret, torch.tensor([1.0, 2.5, 2.0, 6.0])[:, None] * mask)
    adv4, _ = core.compute_rloo(rewards, mask, k=4)  # one group: baseline = mean of the other three
    totals = torch.tensor([1.0, 2.5, 2.0, 6.0])
    torch.testing.assert_close(adv4[:, 0], totals - (totals.sum() - totals) / 3)
    g, _ = core.compute_grpo(rewards, mask, k=2)  # (R - mean) / (std + eps); std of 2 values = |a-b|/sqrt(2)
    torch.testing.assert_close(g[:, 0], torch.tensor([-1.0, 1.0, -1.0, 1.0]) / 2**0.5, atol=1e-5, rtol=1e-5)
    assert (g * (1 - mask)).abs().sum() == 0  # nothing on padding
    with pytest.raises(ValueError, match="samples_per_prompt"):
        core.compute_rloo(rewards, mask, k=3)  # 3 does not divide 4
    a, _ = core.compute_advantages("rloo", torch.zeros(4, 3), rewards, mask, 1.0, 1.0, 2)
    torch.testing.assert_close(a, adv)


def test_the_fused_head_runs_tiles_of_at_least_token_chunk_tokens(monkeypatch):
    """head_chunk_size counts episodes; with short responses one episode is a few tokens, and tiles
    that small re-read the vocabulary-sized weight per tile: the fused head takes TOKEN_CHUNK at least."""
    from stackllama.models import lm_head_logprobs
    from stackllama.ppo import core as core_module

    seen = []

    def recording(*args, token_chunk=None, **kwargs):
        seen.append(token_chunk)
        return lm_head_logprobs.logprobs_and_entropy(*args, token_chunk=token_chunk, **kwargs)

    monkeypatch.setattr(core_module, "logprobs_and_entropy", recording)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden, labels = torch.randn(6, 4, 8), torch.randint(0, 50, (6, 4))
    logprobs_from_hidden(hidden, head, labels, chunk=1)  # 4-token episodes
    logprobs_from_hidden(torch.randn(2, 300, 8), head, torch.randint(0, 50, (2, 300)), chunk=1)  # long ones
    assert seen == [lm_head_logprobs.TOKEN_CHUNK, 300]
