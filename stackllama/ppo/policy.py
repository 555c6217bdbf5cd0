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


def common_left_padding(attention_mask: torch.Tensor, query_len: int) -> int:
    """Leading columns that are padding in every row (< query_len): a sub-batch of left-padded
    episodes keeps the whole batch's longest query's padding. Those columns are masked out as keys
    and predict no response token, so a forward can skip them and give the same states."""
    real = attention_mask[:, :query_len].bool().any(0)  # (Q,) a real token in some row
    return min(int(real.to(torch.int8).argmax()), query_len - 1) if bool(real.any()) else 0


def decoder_of(model: nn.Module) -> nn.Module:
    """The decoder stack (embeddings, layers, final norm) of a causal LM or peft-wrapped one."""
    return model.get_decoder() if hasattr(model, "get_decoder") else model.model


@contextlib.contextmanager
def layer_range(backbone: nn.Module, start: int, stop: int | None, final_norm: bool = True):
    """Make ``backbone`` run only decoder layers ``start:stop`` (and its final norm or not).

    Written by hand because transformers has no public way to run part of a decoder: the
    stack's own ``forward`` is reused (masks, rotary positions, attention backends stay its
    own) with its ``layers`` list swapped for a slice. Llama-family decoders (Llama, Mistral,
    Qwen2, SmolLM) iterate ``self.layers`` and feed ``inputs_embeds`` in unscaled; the policy
    checks the split against a full forward once before relying on it (``frozen_prefix``).
    """
    layers, norm = backbone.layers, backbone.norm
    backbone.layers = nn.ModuleList(list(layers)[start:stop])
    if not final_norm:
        backbone.norm = nn.Identity()
    try:
        yield backbone
    finally:
        backbone.layers, backbone.norm = layers, norm


def response_hidden(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    query_len: int,
    prefix: torch.Tensor | None = None,
    from_layer: int = 0,
) -> torch.Tensor:
    """Last hidden states that predict the response tokens of a causal LM: (B, Q+R) -> (B, R, H).

    ``input_ids`` = [left-padded query (Q) | right-padded response (R)]. Response token t sits
    at position Q + t and is predicted from position Q + t - 1, so only those R states matter;
    positions are counted from the attention mask (left padding skipped), as in ``generate``.
    ``prefix`` (B, Q+R, H): the hidden states after the first ``from_layer`` layers, computed
    before (``prefix_hidden``); only the layers above them run.
    """
    backbone = decoder_of(model)
    start = common_left_padding(attention_mask, query_len)  # the same states without those columns
    if start:
        input_ids, attention_mask, query_len = input_ids[:, start:], attention_mask[:, start:], query_len - start
        prefix = prefix[:, start:] if prefix is not None else None
    kwargs = dict(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False)
    if prefix is None:
        out = backbone(input_ids=input_ids, **kwargs)
    else:
        with layer_range(backbone, from_layer, None):
            out = backbone(inputs_embeds=prefix, **kwargs)
    return out.last_hidden_state[:, query_len - 1 : -1]  # (B, R, H)


def prefix_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int, query_len: int
) -> torch.Tensor:
    """Hidden states after the first ``layers`` decoder layers (no final norm): (B, Q+R) -> (B, Q+R, H).
    Columns that are padding in every row are not run: zeros there (masked keys, never read)."""
    backbone = decoder_of(model)
    start = common_left_padding(attention_mask, query_len)
    ids, att = input_ids[:, start:], attention_mask[:, start:]
    with layer_range(backbone, 0, layers, final_norm=False):
        out = backbone(
            input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att), use_cache=False
        ).last_hidden_state  # (B, Q+R-start, H)
    return torch.nn.functional.pad(out, (0, 0, start, 0)) if start else out


def frozen_layers(model: nn.Module) -> int:
    """How many bottom decoder layers (with the embeddings) hold no trainable parameter: with LoRA
    on the top layers only (``lora.top_layers``) their output is the same for the policy, the
    reference and every PPO epoch, so it can be computed once per rollout. 0 when unknown."""
    try:
        backbone = decoder_of(model)
        layers = list(backbone.layers)
        backbone.norm  # noqa: B018 - the split needs both
    except (AttributeError, TypeError):
        return 0
    if any(p.requires_grad for p in backbone.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return 0  # nothing trainable in the stack: nothing to gain


class PolicyWithValueHead(nn.Module):
    """Causal LM (optionally a peft model) + scalar value head; optional frozen reference.

    ``reference`` is only needed when the policy has no LoRA adapters to switch off.
    """

    def __init__(self, lm: nn.Module, reference: nn.Module | None = None, cache_frozen_prefix: bool = True):
        super().__init__()
        self.lm = lm
        hidden = lm.config.hidden_size if hasattr(lm, "config") else lm.get_base_model().config.hidden_size
        self.v_head = nn.Linear(hidden, 1)
        # Zero-initialised: V = 0 before the critic has learned anything, so the first advantages are
        # the (whitened) returns themselves. A random head adds its own noise to every advantage,
        # which dominates a short run (explained variance of -8 at the first step of the embedded run).
        nn.init.zeros_(self.v_head.weight)
        nn.init.zeros_(self.v_head.bias)
        self.reference = reference
        self.reference_offload: Any = None  # an models.offload.Offloaded of the copy (ppo.offload_ref_reward)
        self.has_adapters = hasattr(lm, "disable_adapter")
        if reference is None and not self.has_adapters:
            raise ValueError("a policy without LoRA adapters needs a separate frozen reference model")
        # Bottom layers shared by policy and reference (adapters only above them): see prefix()
        self.prefix_layers = frozen_layers(self._causal_lm()) if cache_frozen_prefix and reference is None else 0
        if self.prefix_layers and not self._split_matches_full_forward():
            self.prefix_layers = 0

    def _split_matches_full_forward(self) -> bool:
        """One tiny forward both ways: the split must give the full forward's hidden states."""
        model = self._causal_lm()
        device = next(model.parameters()).device
        ids = torch.tensor([[1, 5, 9, 13, 17, 21]], device=device)
        att = torch.tensor([[0, 1, 1, 1, 1, 1]], device=device)
        modes = [(m, m.training) for m in model.modules()]
        model.eval()  # no dropout, and no random numbers drawn: the run's RNG stream stays as it was
        try:
            with torch.no_grad():
                full = response_hidden(model, ids, att, 2)
                split = response_hidden(model, ids, att, 2, self.prefix(ids, att, 2), self.prefix_layers)
        finally:
            for module, mode in modes:
                module.training = mode
        return bool(torch.allclose(full, split, atol=1e-4, rtol=1e-4))

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, query_len: int) -> torch.Tensor | None:
        """(B, Q+R, H) after the frozen bottom layers, or None when nothing is frozen below the adapters.

        Pass it to ``forward`` and ``reference_hidden`` as ``prefix``: the policy, the reference
        (adapters off) and every PPO epoch then run only the layers above it. With adapters on the
        top 8 of SmolLM2's 30 layers that skips ~45% of the no-grad pass and ~60% of each
        training forward.
        """
        if not self.prefix_layers:
            return None
        return prefix_hidden(self._causal_lm(), input_ids, attention_mask, self.prefix_layers, query_len)

    # -- pieces of the causal LM --------------------------------------------------------
    def _causal_lm(self, use_reference: bool = False) -> nn.Module:
        if use_reference and self.reference is not None:
            return self.reference
        return self.lm.get_base_model() if self.has_adapters else self.lm

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_len: int,
        with_values: bool = True,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, nn.Module, torch.Tensor | None]:
        """Hidden states that predict the response tokens (``response_hidden``), the LM head, and
        the values there.

        The (vocabulary-sized) LM head is returned rather than applied:
        ``core.logprobs_from_hidden`` applies it a few episodes at a time, so a full
        (B, R, V) logits tensor never exists (it dominates PPO memory for small models).
        """
        model = self._causal_lm()
        resp_hidden = response_hidden(
            model, input_ids, attention_mask, query_len, prefix, self.prefix_layers
        )  # (B, R, H)
        values = self.values(resp_hidden) if with_values else None  # (B, R)
        return resp_hidden, self.output_head(), values

    def output_head(self) -> nn.Module:
        """The policy's LM head (adapted when lora.target_modules includes lm_head)."""
        return self._causal_lm().get_output_embeddings()

    def values(self, resp_hidden: torch.Tensor) -> torch.Tensor:
        """V(s_t) from the response hidden states: (B, R, H) -> (B, R)."""
        return self.v_head(resp_hidden.to(self.v_head.weight.dtype)).squeeze(-1)

    def reference_resident(self) -> Any:
        """Context in which the reference's weights are in memory (always, unless offloaded)."""
        return self.reference_offload.resident() if self.reference_offload is not None else contextlib.nullcontext()

    @torch.no_grad()
    def reference_hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_len: int,
        prefix: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The same response hidden states and LM head under the reference (adapters off, or the copy)."""
        use_copy = self.reference is not None
        ctx = contextlib.nullcontext() if use_copy else self.lm.disable_adapter()
        with ctx:
            model = self._causal_lm(use_reference=use_copy)
            hidden = response_hidden(
                model, input_ids, attention_mask, query_len, prefix, self.prefix_layers
            )  # (B, R, H)
            head = model.get_output_embeddings()
        if not use_copy and hasattr(head, "lora_A"):  # lora.target_modules includes lm_head: apply it unadapted
            adapted = head

            def head(h: torch.Tensor) -> torch.Tensor:
                with self.lm.disable_adapter():
                    return adapted(h)

        return hidden, head

    def generation_model(self) -> Any:
        """The module whose ``generate`` samples rollouts (adapters active)."""
        return self.lm

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if p.requires_grad and not n.startswith("reference.")]
