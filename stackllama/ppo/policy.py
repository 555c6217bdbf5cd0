"""Policy, value head and reference model on ONE backbone.

TRL's last PPOTrainer held four models (policy, reference, value model, reward model).
Here the value head is a linear layer on the policy's last hidden state, and with LoRA the
reference is the same weights with the adapters switched off (``disable_adapter``), so
policy, value and reference share one copy of the base weights in memory.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from torch import nn


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as ``generate`` uses: cumsum(mask) - 1, clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    query_len: int) -> torch.Tensor:
    """Last hidden states that predict the response tokens of a causal LM: (B, Q+R) -> (B, R, H).

    ``input_ids`` = [left-padded query (Q) | right-padded response (R)]. Response token t sits
    at position Q + t and is predicted from position Q + t - 1, so only those R states matter;
    positions are counted from the attention mask (left padding skipped), as in ``generate``.
    """
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return out.last_hidden_state[:, query_len - 1 : -1]  # (B, R, H)


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

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int, with_values: bool = True
    ) -> tuple[torch.Tensor, nn.Module, torch.Tensor | None]:
        """Hidden states that predict the response tokens (``response_hidden``), the LM head, and
        the values there.

        The (vocabulary-sized) LM head is returned rather than applied:
        ``core.logprobs_from_hidden`` applies it a few episodes at a time, so a full
        (B, R, V) logits tensor never exists (it dominates PPO memory for small models).
        """
        model = self._causal_lm()
        resp_hidden = response_hidden(model, input_ids, attention_mask, query_len)  # (B, R, H)
        values = self.values(resp_hidden) if with_values else None  # (B, R)
        return resp_hidden, model.get_output_embeddings(), values

    def values(self, resp_hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) from the response hidden states: (B, R, H) -> (B, R)."""
        return self.v_head(resp_hidden.to(self.v_head.weight.dtype)).squeeze(-1)

    @torch.no_grad()
    def reference_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The same response hidden states and LM head under the reference (adapters off, or the copy)."""
        use_copy = self.reference is not None
        ctx = contextlib.nullcontext() if use_copy else self.lm.disable_adapter()
        with ctx:
            model = self._causal_lm(use_reference=use_copy)
            hidden = response_hidden(model, input_ids, attention_mask, query_len)  # (B, R, H)
            head = model.get_output_embeddings()
        if not use_copy and hasattr(head, "lora_A"):  # lora.target_modules includes lm_head: apply it unadapted
            adapted = head

            def head(h: torch.Tensor) -> torch.Tensor:
                with self.lm.disable_adapter():
                    return adapted(h)

        return hidden, head

    @torch.no_grad()
    def response_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        """Full (B, R, V) response logits of the policy, for analysis and tests (PPO itself never builds them)."""
        hidden, head, _ = self(input_ids, attention_mask, query_len, with_values=False)
        return head(hidden)

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor:
        """Full (B, R, V) response logits of the reference."""
        hidden, head = self.reference_hidden(input_ids, attention_mask, query_len)
        return head(hidden)

    def generation_model(self) -> Any:
        """The module whose ``generate`` samples rollouts (adapters active)."""
        return self.lm

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("reference.")]
