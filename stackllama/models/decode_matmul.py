"""Generation's few-row matmuls in the weight-major layout on CPU (``weight_major_decode``).

Written by hand because neither torch nor transformers picks a GEMM layout per shape on CPU; the
same observation made the LM head's log-prob kernel weight-major (``lm_head_logprobs``).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

DECODE_ROWS = 64  # at most this many rows (generation's one position per sequence): weight-major


def _weight_major_forward(linear: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        rows = x.reshape(-1, x.shape[-1])  # (n, in)
        if rows.shape[0] > DECODE_ROWS:
            return nn.functional.linear(x, linear.weight, linear.bias)
        w, b = linear.weight, linear.bias
        z = w @ rows.t() if b is None else torch.addmm(b.unsqueeze(-1), w, rows.t())  # (out, n)
        return z.t().reshape(*x.shape[:-1], w.shape[0])

    return forward


@contextlib.contextmanager
def weight_major_decode(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s plain CPU ``nn.Linear`` layers compute few-row products as (W x^T)^T.

    Generation runs every layer on one position per sequence: (8, H) x (H, out) products, which
    torch's ``F.linear`` (MKL's x W^T) runs far below the memory bandwidth that bounds them (~5 of
    ~17 GB/s streaming SmolLM2's projections); the weight-major product does better. On an AMD
    EPYC (Zen 3, AVX2 only): SmolLM2's LM head for 8 rows 41 -> 17 ms, 120 streamed (1536, 576)
    projections 86 -> 68 ms, an 8 x 32-token SmolLM2 generate 7.66 -> 6.61 s (medians of 6,
    alternated; bench/README). The products are the same sums in another order (float rounding;
    the test sees the same samples). Quantized layers (bitsandbytes' subclasses), non-CPU weights
    and products of more than ``DECODE_ROWS`` rows are left as they are."""
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and "forward" not in vars(m)
    ]
    for layer in layers:
        layer.forward = _weight_major_forward(layer)  # an instance attribute: nn.Module.__call__ runs it
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


__all__ = ["weight_major_decode", "DECODE_ROWS"]
