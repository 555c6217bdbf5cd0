"""Per-token log-probabilities through the LM head without the (N, V) logits, fast where there is no Triton.

TRL (1.16) trains SFT and DPO through a fused LM head: ``model(..., fused_lm_head=True)`` returns
log p(target) per token from ``ChunkedLogProbFunction``, which never holds the full logits. On
CUDA its folds are Triton kernels. Without Triton (every CPU run) they fall back to torch ops
over (4096 x 32768) tiles, a dozen elementwise passes each over a tile far larger than the
caches: on SmolLM2 (V = 49152) the head then took about half of an SFT step, twice what the
plain log-softmax costs, and the tile sizes made long (packed) rows cost more per token than
short (padded) ones.

``LogProbsWithoutLogits`` is the same computation with fused aten kernels (``logsumexp``,
``exp``) on chunks of ``TOKEN_CHUNK`` tokens by the whole vocabulary: the forward keeps only
log Z per token, the backward recomputes each chunk's logits (one more matmul) and turns them
into the gradient in place. ``install_for_trl()`` routes TRL's fused head through it where TRL
would use its torch fallback (no Triton for the device) and leaves every Triton path, and
every case it does not cover (logit soft-capping), to TRL. Written by hand: neither TRL nor
transformers has a CPU-efficient chunked log-prob head.

Shapes: N tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

TOKEN_CHUNK = 128  # tokens per (TOKEN_CHUNK, V) logits tile: 25 MB at V = 49152 in fp32
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's optional per-token outputs


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, inv_t: float):
    """(n, H) -> (n, V) float32 logits / temperature (the matmul in ``hidden``'s dtype)."""
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z.float()
    return z if scale * inv_t == 1.0 else z.mul_(scale * inv_t)  # one pass over (n, V) less at T = 1


class LogProbsWithoutLogits(torch.autograd.Function):
    """TRL's ``ChunkedLogProbFunction`` contract: ``apply(hidden (N, H), weight (V, H), bias (V,) | None,
    targets (N,), temperature, token_chunk, softcap (must be None), logit_scale, outputs)`` ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None when not in
    ``outputs``. Gradients flow through log_probs and entropy, to hidden, weight and bias.
    ``token_chunk``: tokens per logits tile (TRL passes its vocabulary chunk there: the router
    replaces it with ``TOKEN_CHUNK``); None or 0: ``TOKEN_CHUNK``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, token_chunk, softcap, logit_scale, outputs):
        if softcap is not None:
            raise ValueError("logit soft-capping is left to TRL's own head")
        ctx.set_materialize_grads(False)  # unused outputs (entropy for logging) send no gradient
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        inv_t = 1.0 / float(temperature)
        chunk = int(token_chunk or TOKEN_CHUNK)
        N = hidden.shape[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        log_z, target_z = torch.empty(N, **f32), torch.empty(N, **f32)
        entropy = torch.empty(N, **f32) if "entropy" in outputs else None
        log_sum_sq = torch.empty(N, **f32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.empty(N, **f32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(N, dtype=torch.bool, device=hidden.device) if "is_top1" in outputs else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                t = targets[s:e]
                z = _logits(hidden[s:e].to(dtype), w, b, float(logit_scale), inv_t)  # (n, V)
                lz = torch.logsumexp(z, -1)  # log Z = log sum_v exp(z_v)
                log_z[s:e] = lz
                target_z[s:e] = z.gather(-1, t.unsqueeze(-1)).squeeze(-1)
                if is_top1 is not None:
                    is_top1[s:e] = z.argmax(-1) == t  # argmax: the first maximum, as TRL counts ties
                if mean_logits is not None:
                    mean_logits[s:e] = z.mean(-1)
                if entropy is not None or log_sum_sq is not None:
                    logp = z.sub_(lz.unsqueeze(-1))  # in place: log p_v = z_v - log Z
                    if log_sum_sq is not None:
                        log_sum_sq[s:e] = torch.logsumexp(2 * logp, -1)  # log sum_v p_v^2
                    if entropy is not None:
                        entropy[s:e] = -(logp.exp() * logp).sum(-1)  # H = -sum_v p_v log p_v
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.dtype, ctx.inv_t, ctx.scale, ctx.has_entropy = dtype, inv_t, float(logit_scale), entropy is not None
        ctx.chunk = chunk
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return target_z - log_z, entropy, log_sum_sq, mean_logits, is_top1  # log p(target) = z_t - log Z

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy, *_unused):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, factor = ctx.dtype, ctx.scale * ctx.inv_t  # dz/d(hidden @ W^T + b) = scale / T
        grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], ctx.chunk):
                e = min(s + ctx.chunk, hidden.shape[0])
                h = hidden[s:e].to(dtype)
                logp = _logits(h, w, b, ctx.scale, ctx.inv_t).sub_(log_z[s:e].unsqueeze(-1))  # (n, V) log p
                p = logp.exp()
                if g_logprobs is not None:  # dL/dz, (n, V)
                    # d log p_t / dz_j = 1[j = t] - p_j
                    g = g_logprobs[s:e].float().unsqueeze(-1)
                    grad = (p * -g).scatter_add_(-1, targets[s:e].unsqueeze(-1), g)
                else:
                    grad = torch.zeros_like(p)
                if g_entropy is not None and ctx.has_entropy:
                    # dH/dz_j = -p_j (log p_j + H)
                    grad.sub_(p.mul_(logp.add_(entropy[s:e].unsqueeze(-1))).mul_(g_entropy[s:e].float().unsqueeze(-1)))
                if factor != 1.0:
                    grad.mul_(factor)
                grad = grad.to(dtype)
                if grad_h is not None:
                    grad_h[s:e] = grad @ w
                if grad_w is not None:
                    grad_w.addmm_(grad.t().float(), h.float())
                if grad_b is not None:
                    grad_b += grad.float().sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *([None] * 6),
        )


def logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    token_chunk: int | None = None,
    with_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and (optionally) the entropy of softmax((hidden @ W^T + b) / T): (N, H), (N,) -> (N,), (N,)."""
    outputs = ("entropy",) if with_entropy else ()
    logprobs, entropy, *_ = LogProbsWithoutLogits.apply(
        hidden, weight, bias, targets, temperature, token_chunk, None, 1.0, outputs
    )
    return logprobs, entropy


def install_for_trl() -> bool:
    """Route TRL's fused LM head through ``LogProbsWithoutLogits`` wherever TRL has no Triton kernel
    for the device (its torch fallback), for models without logit soft-capping. Idempotent; returns
    whether the route is in place (False: this TRL has no fused head to route)."""
    try:
        from trl.kernels.chunked_logprob import _use_triton
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    original = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if original is None:
        log.debug("this TRL has no fused LM head; nothing to route")
        return False
    if getattr(original, "_stackllama_route", False):
        return True

    class Route:
        """Chooses per call: TRL's Triton kernels where they run, ours elsewhere."""

        _stackllama_route = True
        trl_function = original

        @staticmethod
        def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap=None, logit_scale=1.0, outputs=()):
            if _use_triton(hidden.device) or softcap is not None:
                fn, chunk = original, chunk_size  # TRL's: its vocabulary chunk
            else:
                fn, chunk = LogProbsWithoutLogits, None  # ours: TOKEN_CHUNK tokens a tile
            return fn.apply(hidden, weight, bias, targets, temperature, chunk, softcap, logit_scale, outputs)

    trl_utils._ChunkedLogProbFunction = Route
    return True


__all__ = ["LogProbsWithoutLogits", "logprobs_and_entropy", "install_for_trl", "TOKEN_CHUNK"]
