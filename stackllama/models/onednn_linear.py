"""fp32 CPU ``nn.Linear`` layers through oneDNN instead of MKL (``use_onednn_linears``).

torch sends fp32 CPU matmuls to MKL, and MKL runs its AVX2 code on AMD CPUs even where they
have AVX-512; oneDNN, which every torch CPU build carries (bf16 autocast already runs on it),
picks its kernels from the CPU's instruction set. Measured with torch 2.13 on 2 cores of an AMD
EPYC Zen 5 (AVX-512), SmolLM2's training shapes, e.g. (264 x 576) x (576 x 1536): MKL 158-188,
oneDNN 370-410 GFLOP/s; with both capped to AVX2 code (an AVX2-only CPU's paths) MKL 139-170,
oneDNN 168-192 (bench/README, "oneDNN for fp32 linears"). Written by hand because torch has no
switch for it: its oneDNN matmul path serves bf16/fp16, or fp32 only at reduced (bf16/tf32)
internal precision, and ``torch.ops.mkldnn._linear_pointwise`` has no backward. Here each of
the three products of a linear layer (y = x W^T + b, dx = dy W, dW = dy^T x) is one oneDNN
inner product in full fp32: the same sums as MKL's, in another order (float rounding).

Left to ``F.linear``: autocast (bf16 runs on oneDNN already), non-fp32 or non-CPU tensors,
quantized layers (bitsandbytes' subclasses are not plain ``nn.Linear``), empty inputs.
"""

from __future__ import annotations

import functools
import logging
import types
from typing import Any

import torch
from torch import nn

from stackllama.config import CPU_MATMUL
from stackllama.precision import cpu_flags

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN and its linear operator (every x86 CPU wheel does)."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def resolve_cpu_matmul(mode: str) -> str:
    """``auto`` -> ``onednn`` where the CPU has AVX-512 (where MKL may run its AVX2 code) and this
    torch has oneDNN, else ``mkl``; ``onednn`` without oneDNN in this torch -> ``mkl``."""
    if mode not in CPU_MATMUL:
        raise ValueError(f"cpu_matmul={mode!r} is not valid; choose one of: {', '.join(CPU_MATMUL)}")
    if mode == "mkl" or not onednn_available():
        return "mkl"
    if mode == "auto":
        return "onednn" if "avx512f" in cpu_flags() else "mkl"
    return mode


def on_onednn(layer: Any) -> bool:
    """Whether ``use_onednn_linears`` set this layer (its fp32 products then run on oneDNN)."""
    return getattr(vars(layer).get("forward"), "__func__", None) is _onednn_forward


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) @ b (k, n) -> (m, n) as one fp32 oneDNN inner product (b^T as its weight)."""
    return _inner_product(a, b.t(), None)


def _inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (n, in) @ weight (out, in)^T [+ bias (out,)] -> (n, out), one oneDNN primitive, fp32."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with oneDNN for the forward and both backward products. Saves what
    ``F.linear``'s backward saves (x and W), so memory is the same."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # (n, in)
        y = _inner_product(rows, weight, bias)  # (n, out)
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        dy = grad_y.reshape(-1, weight.shape[0])  # (n, out)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _inner_product(dy, weight.t(), None).reshape(x.shape)  # dx = dy W: (n, out) x (out, in)
        if ctx.needs_input_grad[1]:
            # dW = dy^T x: (out, n) x (n, in), as an inner product with x^T (in, n) as its "weight"
            dw = _inner_product(dy.t(), x.reshape(-1, x.shape[-1]).t(), None)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)  # (out,)
        return dx, dw, db


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w, b = self.weight, self.bias
    if (
        x.dtype != torch.float32
        or w.dtype != torch.float32
        or x.device.type != "cpu"
        or w.device.type != "cpu"
        or x.numel() == 0
        or torch.is_autocast_enabled("cpu")
    ):
        return nn.functional.linear(x, w, b)
    return _OneDNNLinear.apply(x, w, b)


def use_onednn_linears(model: nn.Module, cpu_matmul: str = "onednn") -> int:
    """Route ``model``'s plain CPU ``nn.Linear`` layers' fp32 products through oneDNN when
    ``cpu_matmul`` resolves to onednn (``resolve_cpu_matmul``). Returns how many layers it set.

    Each layer gets an instance ``forward`` bound to it (a bound method, so ``copy.deepcopy`` of the
    model binds the copy's to the copy); ``weight_major_decode`` leaves such layers as they are (the
    oneDNN product was faster for generation's few rows too: SmolLM2's rollout ~20% on the Zen 5).
    Called again on the same model it sets nothing more."""
    if resolve_cpu_matmul(cpu_matmul) != "onednn":
        return 0
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.device.type == "cpu" and "forward" not in vars(module):
            module.forward = types.MethodType(_onednn_forward, module)
            count += 1
    return count


__all__ = ["matmul", "on_onednn", "onednn_available", "resolve_cpu_matmul", "use_onednn_linears"]
