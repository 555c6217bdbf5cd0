"""PPO-for-language-models math, in plain torch (no model code, no I/O).

Shapes used in comments:
    B = batch of episodes (prompt + sampled response)
    T = response length (padded)
    V = vocabulary size

Every per-token function takes a ``mask`` of shape (B, T): 1 marks a real response
token, 0 marks padding or tokens after EOS. Masked positions never influence a
statistic or a loss; ``torch.where`` (not ``x * mask``) is used so that even inf/nan
values sitting at masked positions cannot leak into results or gradients.

References: Ziegler et al. 2019 ("Fine-Tuning LMs from Human Preferences"),
Schulman et al. 2017 (PPO), Schulman 2016 (GAE), J. Schulman, "Approximating KL
divergence" (k1/k2/k3), TRL's legacy PPOTrainer (whose conventions we follow).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
from torch import Tensor

from stackllama.models import onednn_linear
from stackllama.models.lm_head_logprobs import TOKEN_CHUNK, logprobs_and_entropy

# --------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------


def _bool_mask(mask: Tensor) -> Tensor:
    return mask.bool() if mask.dtype != torch.bool else mask


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``)."""
    m = _bool_mask(mask)
    x_m = torch.where(m, x, torch.zeros_like(x))  # zero out masked positions (inf-safe)
    m_f = m.to(x.dtype)
    if dim is None:
        return x_m.sum() / m_f.sum().clamp(min=1.0)  # sum(x*m) / sum(m)
    return x_m.sum(dim) / m_f.sum(dim).clamp(min=1.0)  # sum_dim(x*m) / sum_dim(m)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over masked elements (Bessel-corrected if ``unbiased``)."""
    m = _bool_mask(mask)
    mean = masked_mean(x, m)  # mu = E_m[x]
    centered = torch.where(m, x - mean, torch.zeros_like(x))
    var = masked_mean(centered**2, m)  # var = E_m[(x - mu)^2]
    if unbiased:
        n = m.sum().to(x.dtype)
        if n > 1:
            var = var * n / (n - 1)  # var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(x - mu) / sqrt(var + 1e-8) over masked elements; masked outputs are 0.

    With ``shift_mean=False`` the mean is added back (only the scale is normalised).
    """
    m = _bool_mask(mask)
    mean, var = masked_mean(x, m), masked_var(x, m)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)  # (x - mu) / sigma
    if not shift_mean:
        whitened = whitened + mean  # keep the original mean
    return torch.where(m, whitened, torch.zeros_like(whitened))


# --------------------------------------------------------------------------------------
# KL penalty and rewards
# --------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token logprobs, (B, T)."""
    log_ratio = logprobs - ref_logprobs  # log(pi / pi_ref)
    if estimator == "k1":
        return log_ratio  # k1 = logp - logp_ref   (unbiased, high variance)
    if estimator == "k2":
        return 0.5 * log_ratio**2  # k2 = 0.5 * (logp - logp_ref)^2
    if estimator == "k3":
        neg = -log_ratio  # log r, with r = pi_ref / pi
        return torch.expm1(neg) - neg  # k3 = (r - 1) - log r   (unbiased, >= 0)
    if estimator == "abs":
        return log_ratio.abs()  # |logp - logp_ref|
    raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


def last_token_index(mask: Tensor) -> Tensor:
    """(B,) index of the last position where ``mask`` is 1 (0 for an all-zero row)."""
    m = _bool_mask(mask)
    T = m.shape[-1]
    positions = torch.arange(T, device=m.device).expand_as(m)  # (B, T): 0..T-1
    return torch.where(m, positions, torch.full_like(positions, -1)).amax(-1).clamp(min=0)


def compute_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> Tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * KL everywhere, + score (B,) on the last real token.

    Returns ``(rewards, kl)``, both (B, T) and 0 at masked positions.
    """
    m = _bool_mask(mask)
    zeros = torch.zeros_like(logprobs)
    kl = torch.where(m, kl_estimate(logprobs, ref_logprobs, estimator), zeros)  # (B, T)
    rewards = -kl_coef * kl  # r_t = -beta * KL_t
    last = last_token_index(m)  # (B,) index of the last real token
    has_token = m.any(-1)  # (B,) rows without any real token get no score
    score = torch.where(has_token, scores.to(rewards.dtype), torch.zeros_like(scores, dtype=rewards.dtype))
    rewards = rewards.scatter_add(-1, last.unsqueeze(-1), score.unsqueeze(-1))  # r_last += score
    return rewards, kl


# --------------------------------------------------------------------------------------
# Advantages (GAE)
# --------------------------------------------------------------------------------------


def compute_gae(
    values: Tensor,
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[Tensor, Tensor]:
    """Generalised Advantage Estimation over the response tokens.

    Backwards over t:  delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
                       A_t     = delta_t + gamma * lam * A_{t+1}
    The episode ends after the last real token (bootstrap value 0). Masked
    positions are skipped: they carry the next real token's V and A through
    unchanged, so their values/rewards never matter (for a contiguous mask this is
    exactly the formula above). Returns ``(advantages, returns)`` with
    returns = advantages + values, both (B, T) and 0 at masked positions.
    No whitening here: call ``masked_whiten`` on the advantages separately.
    """
    m = _bool_mask(mask)
    B, T = values.shape
    zeros = values.new_zeros(B)
    next_value = zeros  # V_{t+1} of the next real token, 0 past the end (terminal)
    next_adv = zeros  # A_{t+1} of the next real token, 0 past the end
    advantages = []
    for t in reversed(range(T)):
        m_t = m[:, t]  # (B,)
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # delta_t = r_t + g*V_{t+1} - V_t
        adv = delta + gamma * lam * next_adv  # A_t = delta_t + g*lam*A_{t+1}
        adv = torch.where(m_t, adv, zeros)
        advantages.append(adv)
        next_value = torch.where(m_t, values[:, t], next_value)  # skip masked positions
        next_adv = torch.where(m_t, adv, next_adv)
    advantages = torch.stack(advantages[::-1], dim=1)  # (B, T)
    returns = torch.where(m, advantages + values, torch.zeros_like(values))  # R_t = A_t + V_t
    return advantages, returns


def _groups(rewards: Tensor, mask: Tensor, k: int) -> Tensor:
    """(B, R) per-token rewards -> (B/k, k) total reward of each response, rows = one prompt's k samples."""
    B = rewards.shape[0]
    if k < 2 or B % k:
        raise ValueError(f"group estimators need samples_per_prompt >= 2 dividing the batch; got k={k}, B={B}")
    return (rewards * mask).sum(1).view(B // k, k)  # R_i = sum_t r_t (score + KL penalties)


def compute_rloo(rewards: Tensor, mask: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al. 2024): k responses per prompt, each one's baseline
    is the mean total reward of the other k-1.

        A_i = R_i - 1/(k-1) * sum_{j != i} R_j        (every token of response i gets A_i)

    Returns ``(advantages, returns)``, (B, T), 0 at masked positions; returns = the total reward
    R_i on every token (no value head is trained with this estimator)."""
    g = _groups(rewards, mask, k)  # (B/k, k)
    baseline = (g.sum(1, keepdim=True) - g) / (k - 1)  # mean of the other k-1
    adv = (g - baseline).reshape(-1, 1) * mask  # (B, T)
    return adv, g.reshape(-1, 1) * mask


def compute_grpo(rewards: Tensor, mask: Tensor, k: int, eps: float = 1e-6) -> Tuple[Tensor, Tensor]:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath): each response's total reward
    standardized within its prompt's group of k.

        A_i = (R_i - mean_j R_j) / (std_j R_j + eps)  (every token of response i gets A_i)
    """
    g = _groups(rewards, mask, k)  # (B/k, k)
    adv = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)
    return adv.reshape(-1, 1) * mask, g.reshape(-1, 1) * mask


ADVANTAGE_ESTIMATORS = ("gae", "rloo", "grpo")  # gae trains the value head; the group ones need none


def compute_advantages(
    estimator: str, values: Tensor, rewards: Tensor, mask: Tensor, gamma: float, lam: float, k: int
) -> Tuple[Tensor, Tensor]:
    """``(advantages, returns)`` by ``ppo.advantage``: GAE on the value head, or a group baseline
    over the ``k = ppo.samples_per_prompt`` responses of each prompt."""
    if estimator == "gae":
        return compute_gae(values, rewards, mask, gamma, lam)
    if estimator == "rloo":
        return compute_rloo(rewards, mask, k)
    if estimator == "grpo":
        return compute_grpo(rewards, mask, k)
    raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {ADVANTAGE_ESTIMATORS}")


# --------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cliprange: float,
    dual_clip: Optional[float] = None,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """PPO clipped surrogate, averaged over real tokens. Returns ``(loss, stats)``.

    ``dual_clip = c > 1`` (Ye et al. 2020, as verl's ``clip_ratio_c``): where A < 0 the loss is
    also capped at -c * A, so a token whose ratio has grown huge under a negative advantage
    cannot dominate the batch (the plain clip only bounds the ratio from one side there).
    """
    m = _bool_mask(mask)
    zeros = torch.zeros_like(logprobs)
    log_ratio = torch.where(m, logprobs - old_logprobs, zeros)  # log(pi / pi_old); 0 when masked
    adv = torch.where(m, advantages, zeros)
    ratio = torch.exp(log_ratio)  # rho = pi / pi_old
    clipped = torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)  # clip(rho, 1-eps, 1+eps)
    pg_unclipped = -adv * ratio  # -A * rho
    pg_clipped = -adv * clipped  # -A * clip(rho)
    pg = torch.max(pg_unclipped, pg_clipped)  # pessimistic bound: max(-A rho, -A clip(rho))
    dual_frac = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    if dual_clip is not None:
        if not dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        capped = torch.min(pg, -adv * dual_clip)  # min(max(-A rho, -A clip(rho)), -c A)
        dual = (adv < 0) & (capped < pg)
        dual_frac = masked_mean(dual.to(logprobs.dtype), m)
        pg = torch.where(adv < 0, capped, pg)  # only where A < 0
    loss = masked_mean(pg, m)  # L = E_m[pg]

    with torch.no_grad():
        stats = {
            "approxkl": 0.5 * masked_mean(log_ratio**2, m),  # 0.5 * E[(logp - logp_old)^2]
            "policykl": masked_mean(-log_ratio, m),  # E[logp_old - logp]
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(logprobs.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
            "ratio_max": torch.where(m, ratio, torch.full_like(ratio, float("-inf"))).max(),
            "dual_clipfrac": dual_frac,
        }
    stats = {k: v.detach() for k, v in stats.items()}
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    cliprange_value: float,
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Clipped value loss 0.5 * E[max((V - R)^2, (V_clip - R)^2)]. Returns ``(loss, stats)``."""
    m = _bool_mask(mask)
    zeros = torch.zeros_like(values)
    v = torch.where(m, values, zeros)
    v_old = torch.where(m, old_values, zeros)
    ret = torch.where(m, returns, zeros)
    v_clipped = v_old + torch.clamp(v - v_old, -cliprange_value, cliprange_value)  # V_old + clip(V - V_old)
    vf_unclipped = (v - ret) ** 2  # (V - R)^2
    vf_clipped = (v_clipped - ret) ** 2  # (V_clip - R)^2
    loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), m)

    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((vf_clipped > vf_unclipped).to(values.dtype), m),
            "error": masked_mean(vf_unclipped, m),  # E[(V - R)^2]
        }
    stats = {k: s.detach() for k, s in stats.items()}
    return loss, stats


# --------------------------------------------------------------------------------------
# Logit helpers
# --------------------------------------------------------------------------------------


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: (B, T, V) -> (B, T)."""
    probs = torch.softmax(logits, dim=-1)  # p = softmax(z)
    finite_logits = logits.masked_fill(~torch.isfinite(logits), 0.0)  # p=0 where z=-inf: avoid 0*inf
    # H = -sum p log p = logsumexp(z) - sum p * z
    return torch.logsumexp(logits, dim=-1) - (probs * finite_logits).sum(-1)


def logprobs_from_hidden(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    chunk: int = 1,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor | None]:
    """log p(y_t) (and the entropy) from hidden states, never holding a (B, T, V) logits tensor.

    p = softmax(head(h) / temperature): the distribution the rollout sampled from, so the PPO
    ratio and the KL compare the policies that actually produced the tokens (an N+ detail of
    Huang et al. 2024; with T != 1 and undivided logits every ratio would be off from the start).
    (B, T, H), (B, T) -> (B, T) [, (B, T)]. The vocabulary-sized LM head is applied to
    ``chunk`` episodes at a time; with grad enabled each chunk (when there are several) runs
    under activation checkpointing, so backward recomputes its (chunk, T, V) logits instead of
    keeping them.
    For a small model the logits, not the weights, are most of PPO's memory (V = 49,152 vs
    H = 576 for SmolLM2): this cuts peak memory by ~(B / chunk) x (T x V) floats per pass, for one
    extra head matmul per chunk in backward. Written by hand: neither transformers nor peft
    exposes a chunked log-prob (Liger's fused linear cross-entropy is GPU-only).
    """
    chunk = max(int(chunk), 1)
    grad = torch.is_grad_enabled() and hidden.requires_grad
    if grad and with_entropy:
        raise ValueError("entropy is a no-grad statistic here; call with torch.no_grad()")

    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if type(head) is torch.nn.Linear:  # a plain head (not adapted, not quantized): the fused path
        # (stackllama/models/lm_head_logprobs.py): the logits of chunk x T tokens at a time, the
        # backward recomputing them; one weight-gradient matmul per tile, fused softmax kernels.
        # At least TOKEN_CHUNK tokens a tile: every tile re-reads the (V, H) weight three times
        # (logits, recomputed logits, input gradient) and its gradient once, so 32-token tiles (one
        # short response) made SmolLM2's head fwd+bwd 1.4x slower than 128-token ones, to save
        # 19 MB per (tile, V) temporary.
        B, T, H = hidden.shape
        logps, ents = logprobs_and_entropy(
            hidden.reshape(B * T, H).to(head.weight.dtype),
            head.weight,
            head.bias,
            labels.reshape(B * T),
            float(temperature),
            token_chunk=max(chunk * T, TOKEN_CHUNK),
            with_entropy=with_entropy,
            onednn=onednn_linear.on_onednn(head),  # the head's products where its layer runs them
        )
        return logps.view(B, T), (ents.view(B, T) if ents is not None else None)
    scale = 1.0 / float(temperature)

    def logits_of(h: Tensor) -> Tensor:
        z = head(h)  # (c, T, V)
        return z if scale == 1.0 else z * scale  # z / T

    def piece(h: Tensor, y: Tensor) -> Tensor:
        return logprobs_from_logits(logits_of(h), y)  # (c, T, V) logits live only inside this call

    logps, ents = [], []
    for s in range(0, hidden.shape[0], chunk):
        h, y = hidden[s : s + chunk], labels[s : s + chunk]
        if grad and chunk < hidden.shape[0]:  # one chunk for all: nothing to save by recomputing
            logps.append(torch.utils.checkpoint.checkpoint(piece, h, y, use_reentrant=False))
        elif with_entropy:
            logits = logits_of(h)  # (c, T, V)
            logps.append(logprobs_from_logits(logits, y))
            ents.append(entropy_from_logits(logits))
            del logits
        else:
            logps.append(piece(h, y))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log softmax(logits)[labels]: (B, T, V), (B, T) -> (B, T).

    Avoids materialising a full (B, T, V) log_softmax: log p(y) = z_y - logsumexp(z),
    computed row by row. Half-precision inputs use a per-row log_softmax instead,
    which is more accurate there.
    """
    labels = labels.unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in (torch.float32, torch.float64):
        picked = logits.gather(-1, labels).squeeze(-1)  # z_y, (B, T)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # (B, T)
        return picked - lse  # log p(y) = z_y - logsumexp(z)
    rows = []
    for row_logits, row_labels in zip(logits, labels):  # one (T, V) slab at a time
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(-1, row_labels).squeeze(-1))
    return torch.stack(rows)


def explained_variance(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """1 - Var[target - pred] / Var[target] over masked elements (1 = perfect, <=0 = useless)."""
    m = _bool_mask(mask)
    var_target = masked_var(target, m)
    var_resid = masked_var(target - pred, m)
    return 1.0 - var_resid / var_target.clamp(min=1e-8)


# --------------------------------------------------------------------------------------
# KL coefficient controllers
# --------------------------------------------------------------------------------------


class FixedKLController:
    """Constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass  # beta stays fixed

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, d: Dict[str, float]) -> None:
        self.value = float(d["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019), steering the KL towards ``target``."""

    def __init__(self, init_kl_coef: float = 0.2, target: float = 6.0, horizon: float = 10000):
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = current_kl / self.target - 1.0  # e = KL / KL_target - 1
        error = min(max(error, -0.2), 0.2)  # e = clip(e, -0.2, 0.2)
        mult = 1.0 + error * n_steps / self.horizon  # mult = 1 + e * n / horizon
        self.value *= mult  # beta <- beta * mult

    def state_dict(self) -> Dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: Dict[str, float]) -> None:
        self.value = float(d["value"])
        self.target = float(d.get("target", self.target))
        self.horizon = float(d.get("horizon", self.horizon))


# --------------------------------------------------------------------------------------
# Response length sampling
# --------------------------------------------------------------------------------------


class LengthSampler:
    """Uniform integers in [min_value, max_value), with its own seeded, checkpointable RNG."""

    def __init__(self, min_value: int, max_value: int, seed: Optional[int] = None):
        if max_value <= min_value:
            raise ValueError(f"need min_value < max_value, got [{min_value}, {max_value})")
        self.min_value = int(min_value)
        self.max_value = int(max_value)
        self.rng = random.Random(seed)

    def __call__(self) -> int:
        return self.rng.randrange(self.min_value, self.max_value)  # min <= n < max

    def state_dict(self) -> dict:
        version, internal, gauss_next = self.rng.getstate()
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rng_state": [version, list(internal), gauss_next],  # plain lists: easy to serialise
        }

    def load_state_dict(self, d: dict) -> None:
        self.min_value = int(d["min_value"])
        self.max_value = int(d["max_value"])
        version, internal, gauss_next = d["rng_state"]
        self.rng.setstate((version, tuple(internal), gauss_next))


# --------------------------------------------------------------------------------------
# Reward-hacking monitor
# --------------------------------------------------------------------------------------


def repetition_stats(
    token_ids_list: Sequence[Sequence[int]],
    texts: Sequence[str],
    fence: str = "```",
) -> Dict[str, float]:
    """Fractions of a batch of responses that look like reward hacking.

    A response is *repeat-dominated* when it has >= 4 tokens and its most frequent
    token id makes up > 50% of them; it is *fence spam* when its text contains
    ``fence`` >= 3 times. Pass only the response tokens (no padding).
    Returns ``{"frac_repeat_dominated", "frac_fence_spam", "frac_hacking"}`` (either).
    """
    if len(token_ids_list) != len(texts):
        raise ValueError(f"{len(token_ids_list)} token lists but {len(texts)} texts")
    n = len(texts)
    if n == 0:
        return {"frac_repeat_dominated": 0.0, "frac_fence_spam": 0.0, "frac_hacking": 0.0}
    n_repeat = n_fence = n_either = 0
    for ids, text in zip(token_ids_list, texts):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        top_count = Counter(ids).most_common(1)[0][1] if ids else 0
        repeat = len(ids) >= 4 and top_count > 0.5 * len(ids)  # top token > 50% of tokens
        fence_spam = bool(fence) and text.count(fence) >= 3
        n_repeat += repeat
        n_fence += fence_spam
        n_either += repeat or fence_spam
    return {
        "frac_repeat_dominated": n_repeat / n,
        "frac_fence_spam": n_fence / n,
        "frac_hacking": n_either / n,
    }


class RunningMoments:
    """Running mean/std of scores (Welford), for ``ppo.score_normalize: running``: s <- (s - mean) / std."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        for x in xs.tolist():
            self.count += 1
            delta = x - self.mean
            self.mean += delta / self.count
            self.m2 += delta * (x - self.mean)

    @property
    def std(self) -> float:
        """Sample std; 1.0 until there are two values or when they are all equal (nothing to scale by)."""
        std = math.sqrt(self.m2 / max(self.count - 1, 1)) if self.count > 1 else 1.0
        return std if std > 1e-6 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
