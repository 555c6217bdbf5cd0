"""Policy, value head and reference model on ONE backbone.

TRL's last PPOTrainer held four models (policy, reference, value model, reward model).
Here the value head is a linear layer on the policy's last hidden state, and with LoRA the
reference is the same weights with the adapters switched off (``disable_adapter``), so
policy, value and reference share one copy of the base weights in memory.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PolicyWithValueHead(nn.Module):
    """Causal LM (optionally a peft model) + scalar value head; optional frozen reference.

    ``reference`` is only needed when the policy has no LoRA adapters to switch off.
    """

    def __init__(self, lm: nn.Module, reference: nn.Module | None = None):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm, "config") else lm.get_base_model().config.hidden_size
        self.v_head = nn.Linear(hidden, 1)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.v_head.bias)
        self.reference = reference
        self.has_adapters = hasattr(lm, "disable_adapter")
        if reference is None and not self.has_adapters:
            raise ValueError("a policy without LoRA adapters needs a separate frozen reference model")

    # -- pieces of the causal LM --------------------------------------------------------
    def _causal_lm(self, use_reference: bool = False) -> nn.Module:
        if use_reference and self.reference is not None:
            return self.reference
        return self.lm.get_base_model() if self.has_adapters else self.lm

    def _hidden(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        out = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state  # (B, Q+R, H)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits that predict the response tokens, and the values at those positions.

        ``input_ids`` = [left-padded query (Q) | right-padded response (R)]. Response token t
        sits at position Q + t and is predicted from position Q + t - 1, so only those R
        hidden states go through the (vocabulary-sized) LM head: a large memory saving.
        """
        model = self._causal_lm()
        hidden = self._hidden(model, input_ids, attention_mask)  # (B, Q+R, H)
        resp_hidden = hidden[:, query_len - 1 : -1]  # (B, R, H)
        logits = model.get_output_embeddings()(resp_hidden)  # (B, R, V)
        values = None
        if with_values:
            values = self.v_head(resp_hidden.to(self.v_head.weight.dtype)).squeeze(-1)  # (B, R)
        return logits, values

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        """The same response logits under the reference (adapters disabled, or the frozen copy)."""
        use_copy = self.reference is not None
        ctx = contextlib.nullcontext() if use_copy else self.lm.disable_adapter()
        with ctx:
            model = self._causal_lm(use_reference=use_copy)
            hidden = self._hidden(model, input_ids, attention_mask)
            return model.get_output_embeddings()(hidden[:, query_len - 1 : -1])

    def generation_model(self) -> Any:
        """The module whose ``generate`` samples rollouts (adapters active)."""
        return self.lm

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("reference.")]
