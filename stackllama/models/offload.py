"""Frozen models held out of memory between uses (``ppo.offload_ref_reward``).

Full-fine-tuning PPO holds four sets of weights-sized tensors while it trains (policy,
gradients, two AdamW moments) and two frozen models it needs only once a step: the reference
(for the KL) and the reward model (for the score). ``Offloaded`` keeps a frozen model's weights
elsewhere and brings them back for the duration of a ``with offloaded.resident():`` block:

* on CPU: in a safetensors file (written once, at wrap time); the weights are read back from
  it, usually from the OS page cache, which the kernel may reclaim under memory pressure;
* on CUDA: in host memory (pinned where possible), copied to the GPU for each use.

The weights come back bit for bit, so results are the same as without offloading (tested);
only time is spent (a read of the model's bytes per use). This is OpenRLHF's
``--ref_reward_offload`` and verl's ``param_offload`` for the reference, at whole-model
granularity: the frozen models are needed for one pass a step, not per layer.

Written by hand because accelerate's ``disk_offload``/``cpu_offload`` work per layer through
forward hooks, while PPO reads the reference's LM head weight directly (the fused log-prob
head in ``lm_head_logprobs``), which those hooks leave on the meta device. Only parameters
move; buffers (rotary tables) are small and stay. Quantized (bitsandbytes) weights carry
state of their own and are refused: they are small already.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from stackllama.models.loader import is_quantized

log = logging.getLogger(__name__)


def unique_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(first name, parameter) once per parameter object: tied weights (embeddings = LM head) once."""
    seen: set[int] = set()
    out = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((name, p))
    return out


class Offloaded:
    """A frozen model whose parameters live off the compute device except inside ``resident()``.

    ``Offloaded(model, folder)`` saves the parameters (to ``folder / f"{name}.safetensors"`` on
    CPU, to host memory on CUDA) and releases them at once; ``resident()`` nests (only the
    outermost block loads and releases). ``nbytes`` is what a release frees.
    """

    def __init__(self, model: nn.Module, folder: Path | str | None = None, name: str = "model"):
        if is_quantized(model):
            raise ValueError("offloading needs unquantized weights (quantization.mode=none)")
        if any(p.requires_grad for p in model.parameters()):
            raise ValueError(f"only frozen models are offloaded; {name} has trainable parameters")
        self.model = model
        self.params = unique_parameters(model)
        self.device = self.params[0][1].device if self.params else torch.device("cpu")
        self.nbytes = sum(p.numel() * p.element_size() for _, p in self.params)
        self._depth = 0
        self._file: Path | None = None
        self._host: dict[str, torch.Tensor] = {}
        if self.device.type == "cpu":
            from safetensors.torch import save_file

            if folder is None:
                raise ValueError("offloading a CPU model needs a folder for its weights")
            folder = Path(folder)
            folder.mkdir(parents=True, exist_ok=True)
            self._file = folder / f"{name}.safetensors"
            save_file({n: p.detach().contiguous() for n, p in self.params}, str(self._file))
        else:
            pin = torch.cuda.is_available()
            self._host = {n: p.detach().to("cpu").pin_memory() if pin else p.detach().to("cpu") for n, p in self.params}
        self._release()
        log.info("%s offloaded between uses (%.0f MB)", name, self.nbytes / 2**20)

    def _release(self) -> None:
        for _, p in self.params:  # the Parameter objects stay (tied modules keep sharing them)
            p.data = torch.empty(0, dtype=p.dtype, device=self.device)

    def _load(self) -> None:
        if self._file is not None:
            from safetensors import safe_open

            with safe_open(str(self._file), framework="pt", device="cpu") as f:
                for n, p in self.params:
                    p.data = f.get_tensor(n)
        else:
            for n, p in self.params:
                p.data = self._host[n].to(self.device, non_blocking=True)

    @contextlib.contextmanager
    def resident(self) -> Iterator[nn.Module]:
        """The model with its weights in place for the block; released after the outermost one."""
        if self._depth == 0:
            self._load()
        self._depth += 1
        try:
            yield self.model
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._release()

    def close(self) -> None:
        """Delete the weights' file (CPU) or host copy (CUDA); the model is unusable after it."""
        if self._file is not None:
            self._file.unlink(missing_ok=True)
            try:
                self._file.parent.rmdir()  # the last one out removes the folder
            except OSError:
                pass
        self._host = {}

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with the weights resident for each call."""

        def resident_call(*args: Any, **kwargs: Any) -> Any:
            with self.resident():
                return fn(*args, **kwargs)

        return resident_call


__all__ = ["Offloaded", "unique_parameters"]
