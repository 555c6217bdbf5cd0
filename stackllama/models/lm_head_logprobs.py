"""Per-token log-probabilities through the LM head without the (N, V) logits, fast where there is no Triton.

TRL (1.16) trains SFT and DPO through a fused LM head: ``model(..., fused_lm_head=True)`` returns
log p(target) per token from ``ChunkedLogProbFunction``, which never holds the full logits. On
CUDA its folds are Triton kernels. Without Triton (every CPU run) they fall back to torch ops
over (4096 x 32768) tiles, a dozen elementwise passes each over a tile far larger than the
caches: on SmolLM2 (V = 49152) the head then took about half of an SFT step, twice what the
plain log-softmax costs, and the tile sizes made long (packed) rows cost more per token than
short (padded) ones.

``LogProbsWithoutLogits`` is the same computation with fused aten kernels (``logsumexp``,
``exp``) on tiles of ``TOKEN_CHUNK`` tokens, each swept over the vocabulary ``VOCAB_BLOCK`` rows
at a time: the forward keeps only log Z per token, the backward recomputes each block's logits
(one more matmul) and turns them into the gradient in place, writing the weight gradient's rows
block by block. ``install_for_trl()`` routes TRL's fused head through it where TRL
would use its torch fallback (no Triton for the device) and leaves every Triton path, and
every case it does not cover (logit soft-capping), to TRL. Written by hand: neither TRL nor
transformers has a CPU-efficient chunked log-prob head.

Shapes: N tokens, H hidden size, V vocabulary.
"""

from __future__ import annotations

import logging

import torch

from stackllama.models import onednn_linear

log = logging.getLogger(__name__)

TOKEN_CHUNK = 128  # tokens per tile: the (V, H) weight is read ~4 times per tile (fwd, recompute, two grads)
# Vocabulary rows per logits block: a (VOCAB_BLOCK, TOKEN_CHUNK) float32 block is 1 MB, so the
# elementwise passes run in cache and no (tokens, V) tile is ever allocated (1024-4096 measured alike).
VOCAB_BLOCK = 2048
OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # TRL's optional per-token outputs


def _mm(a: torch.Tensor, b: torch.Tensor, onednn: bool) -> torch.Tensor:
    """a @ b; on oneDNN where the head layer is (``ppo.cpu_matmul``) and both are float32."""
    if onednn and a.dtype == b.dtype == torch.float32:
        return onednn_linear.matmul(a, b)
    return a @ b


def _block_logits(
    w: torch.Tensor, b: torch.Tensor | None, hT: torch.Tensor, factor: float, onednn: bool = False
) -> torch.Tensor:
    """(Vb, H) weight rows, (Vb,) bias, (H, n) hidden^T -> (Vb, n) float32 logits x factor (scale / T).

    Weight-major (W_b @ h^T, not h @ W_b^T): on a Zen 3 EPYC MKL ran SmolLM2's head for 128 tokens
    1.15-1.75x faster this way round (bench/README); each block's reductions then run over its rows."""
    z = _mm(w, hT, onednn) if b is None else torch.addmm(b.unsqueeze(-1), w, hT)
    z = z.float()
    return z if factor == 1.0 else z.mul_(factor)  # one pass over the block less at T = 1


def _in_block(targets: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) targets -> whether each falls in vocabulary rows [start, stop), and its row there (clamped)."""
    inside = (targets >= start) & (targets < stop)
    return inside, (targets - start).clamp_(0, stop - start - 1)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool, onednn: bool = False) -> None:
    """out (float32) = a @ b on ``first``, else out += a @ b; a, b in the pass's dtype."""
    if onednn and a.dtype == torch.float32:
        product = onednn_linear.matmul(a, b)  # oneDNN has no out=: one copy of the block more
        out.copy_(product) if first else out.add_(product)
    elif a.dtype == out.dtype:
        torch.mm(a, b, out=out) if first else out.addmm_(a, b)
    else:
        out.copy_(a @ b) if first else out.add_(a @ b)


class LogProbsWithoutLogits(torch.autograd.Function):
    """TRL's ``ChunkedLogProbFunction`` contract: ``apply(hidden (N, H), weight (V, H), bias (V,) | None,
    targets (N,), temperature, token_chunk, softcap (must be None), logit_scale, outputs)`` ->
    (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1), each (N,) or None when not in
    ``outputs``. Gradients flow through log_probs and entropy, to hidden, weight and bias.
    A tenth argument, ``onednn`` (default False; TRL passes nine), runs the fp32 products on oneDNN
    (``ppo.cpu_matmul``, stackllama/models/onednn_linear.py).
    ``token_chunk``: tokens per tile (TRL passes its vocabulary chunk there: the router replaces
    it with ``TOKEN_CHUNK``); None or 0: ``TOKEN_CHUNK``. Each tile's logits are computed
    ``VOCAB_BLOCK`` vocabulary rows at a time and combined across blocks:
    log Z = logsumexp_b(L_b) with L_b = log sum_{v in b} exp(z_v), and the entropy from each
    block's own H_b (stable: no lz - E[z] cancellation)."""

    @staticmethod
    def forward(
        ctx, hidden, weight, bias, targets, temperature, token_chunk, softcap, logit_scale, outputs, onednn=False
    ):
        if softcap is not None:
            raise ValueError("logit soft-capping is left to TRL's own head")
        ctx.set_materialize_grads(False)  # unused outputs (entropy for logging) send no gradient
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        factor = float(logit_scale) / float(temperature)  # z = (h W^T + b) x scale / T
        chunk, block = int(token_chunk or TOKEN_CHUNK), int(VOCAB_BLOCK)
        (N, _), V = hidden.shape, weight.shape[0]
        f32 = dict(device=hidden.device, dtype=torch.float32)
        log_z, target_z = torch.empty(N, **f32), torch.zeros(N, **f32)
        entropy = torch.empty(N, **f32) if "entropy" in outputs else None
        log_sum_sq = torch.empty(N, **f32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.zeros(N, **f32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(N, dtype=torch.bool, device=hidden.device) if "is_top1" in outputs else None
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(device_type, enabled=False):
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                hT, t = hidden[s:e].to(dtype).t(), targets[s:e]  # (H, n), (n,)
                lse, ent, sq = [], [], []  # per block, each (n,)
                best = best_at = None  # running max logit and its vocabulary index (is_top1)
                for vs in range(0, V, block):
                    ve = min(vs + block, V)
                    z = _block_logits(w[vs:ve], None if b is None else b[vs:ve], hT, factor, onednn)  # (Vb, n)
                    inside, row = _in_block(t, vs, ve)
                    target_z[s:e] = torch.where(inside, z.gather(0, row.unsqueeze(0)).squeeze(0), target_z[s:e])
                    if is_top1 is not None:  # the first maximum, as TRL counts ties: later blocks must beat it
                        top, at = z.max(0)
                        if best is None:
                            best, best_at = top, at
                        else:
                            better = top > best
                            best, best_at = torch.where(better, top, best), torch.where(better, at + vs, best_at)
                    if mean_logits is not None:
                        mean_logits[s:e] += z.sum(0) / V
                    if log_sum_sq is not None:
                        sq.append(torch.logsumexp(2 * z, 0))  # log sum_{v in b} exp(2 z_v)
                    lse.append(torch.logsumexp(z, 0))  # L_b = log sum_{v in b} exp(z_v)
                    if entropy is not None:
                        logp = z.sub_(lse[-1])  # in place: log of the softmax within the block
                        ent.append(-(logp.exp() * logp).sum(0))  # H_b = -sum_{v in b} p_v|b log p_v|b
                L = torch.stack(lse)  # (blocks, n)
                lz = torch.logsumexp(L, 0)  # log Z = log sum_b exp(L_b)
                log_z[s:e] = lz
                if entropy is not None:  # H = sum_b w_b (H_b - log w_b), w_b = exp(L_b - log Z)
                    log_w = L - lz
                    entropy[s:e] = (log_w.exp() * (torch.stack(ent) - log_w)).sum(0)
                if log_sum_sq is not None:  # log sum_v p_v^2 = logsumexp_v(2 z_v) - 2 log Z
                    log_sum_sq[s:e] = torch.logsumexp(torch.stack(sq), 0) - 2 * lz
                if is_top1 is not None:
                    is_top1[s:e] = best_at == t
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, log_z if entropy is None else entropy)
        ctx.dtype, ctx.factor, ctx.has_entropy = dtype, factor, entropy is not None
        ctx.chunk, ctx.block, ctx.onednn = chunk, block, bool(onednn)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return target_z - log_z, entropy, log_sum_sq, mean_logits, is_top1  # log p(target) = z_t - log Z

    @staticmethod
    def backward(ctx, g_logprobs, g_entropy, *_unused):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype, factor, chunk, block, onednn = ctx.dtype, ctx.factor, ctx.chunk, ctx.block, ctx.onednn
        (N, _), V = hidden.shape, weight.shape[0]
        f32 = dict(dtype=torch.float32, device=hidden.device)
        # empty, not zeros: the first tile writes every row of each (a fresh 113 MB zero-fill costs
        # about as much as the weight-gradient matmul that then overwrites it)
        grad_h = torch.empty(hidden.shape, **f32) if need_h else None
        grad_w = torch.empty(weight.shape, **f32) if need_w else None
        grad_b = torch.empty(V, **f32) if need_b else None
        use_entropy = g_entropy is not None and ctx.has_entropy
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, N, chunk):
                e = min(s + chunk, N)
                h, t = hidden[s:e].to(dtype), targets[s:e]  # (n, H), (n,)
                g = None if g_logprobs is None else g_logprobs[s:e].float()  # (n,)
                for vs in range(0, V, block):
                    ve = min(vs + block, V)
                    bias_b = None if b is None else b[vs:ve]
                    logp = _block_logits(w[vs:ve], bias_b, h.t(), factor, onednn).sub_(log_z[s:e])
                    p = logp.exp()  # (Vb, n)
                    if g is not None:  # dL/dz_j = g (1[j = t] - p_j): d log p_t / dz_j = 1[j = t] - p_j
                        inside, row = _in_block(t, vs, ve)
                        grad = (p * -g).scatter_add_(0, row.unsqueeze(0), (g * inside).unsqueeze(0))
                    else:
                        grad = torch.zeros_like(p)
                    if use_entropy:  # dH/dz_j = -p_j (log p_j + H)
                        grad.sub_(p.mul_(logp.add_(entropy[s:e])).mul_(g_entropy[s:e].float()))
                    if factor != 1.0:
                        grad.mul_(factor)  # dz/d(h W^T + b) = scale / T
                    grad = grad.to(dtype)  # (Vb, n)
                    if grad_h is not None:  # dL/dh = sum_b grad_b^T W_b
                        _mm_into(grad_h[s:e], grad.t(), w[vs:ve], vs == 0, onednn)
                    if grad_w is not None:  # dL/dW_b = sum over tiles of grad_b h, in float32 (a no-op in fp32)
                        _mm_into(grad_w[vs:ve], grad.float(), h.float(), s == 0, onednn)
                    if grad_b is not None:
                        part = grad.float().sum(1)
                        grad_b[vs:ve] = part if s == 0 else grad_b[vs:ve] + part
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            *([None] * 7),
        )


def logprobs_and_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float = 1.0,
    token_chunk: int | None = None,
    with_entropy: bool = False,
    onednn: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) and (optionally) the entropy of softmax((hidden @ W^T + b) / T): (N, H), (N,) -> (N,), (N,).
    ``onednn``: the fp32 products on oneDNN (the head layer's own setting, ``ppo.cpu_matmul``)."""
    outputs = ("entropy",) if with_entropy else ()
    logprobs, entropy, *_ = LogProbsWithoutLogits.apply(
        hidden, weight, bias, targets, temperature, token_chunk, None, 1.0, outputs, onednn
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


__all__ = [
    "LogProbsWithoutLogits",
    "logprobs_and_entropy",
    "install_for_trl",
    "TOKEN_CHUNK",
    "VOCAB_BLOCK",
]
