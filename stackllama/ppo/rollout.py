"""Rollouts: draw prompts, sample responses in one batched, KV-cached ``generate`` call.

The article sampled a length per response (32..127 tokens) and generated one by one. We
generate the whole batch at once up to the longest sampled length, then mask each response
past its own length (and past EOS when ``stop_at_eos``): the same distribution of
responses, a fraction of the wall time.

EOS and the sampling distribution: every sampled token must come from the distribution whose
log-probs PPO computes (softmax(logits / temperature), no top-k/top-p truncation by
default). So EOS is never *suppressed* (``min_new_tokens`` would mask it out of the
distribution: the tokens then come from another policy than the one PPO scores, and the
sequence KL can come out negative, TRL #1017). With ``stop_at_eos=false`` (the article)
generation simply ignores EOS and keeps sampling past it to the sampled length; with
``stop_at_eos=true`` a response ends at its first EOS (kept in the response) and
``Rollout.ended`` says which responses reached one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from stackllama.models.decode_matmul import weight_major_decode
from stackllama.models.padding import pad
from stackllama.ppo.policy import decoder_of

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of episodes. Shapes: B episodes, Q padded query length, R response length."""

    questions: list[str]
    query_ids: torch.Tensor  # (B, Q) left-padded
    response_ids: torch.Tensor  # (B, R) right-padded
    input_ids: torch.Tensor  # (B, Q+R) = [query | response]
    attention_mask: torch.Tensor  # (B, Q+R) 1 on real query and response tokens
    response_mask: torch.Tensor  # (B, R) 1 on response tokens that count
    responses: list[str]  # decoded responses (masked tokens dropped)
    ended: torch.Tensor  # (B,) bool: the counted tokens end with EOS (stop_at_eos only; else all False)
    prefix: torch.Tensor | None = None  # (B, Q+R, H) output of the frozen bottom layers, set by the no-grad pass
    # (B, R, H) the policy's last hidden states that predicted each response token, as generation
    # computed them (keep_hidden): pi_old's log-probs and values without another forward pass
    hidden: torch.Tensor | None = None

    @property
    def query_len(self) -> int:
        return self.query_ids.shape[1]


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries padded on the left, so every response starts at the same column."""
    return pad(seqs, pad_id, side="left")


def response_mask_from(
    response_ids: torch.Tensor, lengths: list[int], eos_id: int | None, stop_at_eos: bool
) -> torch.Tensor:
    """1 for tokens within each sampled length; with ``stop_at_eos`` also cut after the first EOS."""
    B, R = response_ids.shape
    positions = torch.arange(R).unsqueeze(0)  # (1, R)
    mask = positions < torch.tensor(lengths).unsqueeze(1)  # (B, R)
    if stop_at_eos and eos_id is not None:
        is_eos = (response_ids == eos_id) & mask
        # index of first EOS (R when none); the EOS token itself stays in the response
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((B,), R))
        mask &= positions <= first.unsqueeze(1)
    return mask.long()


@torch.no_grad()
def generate_rollout(
    model: Any,
    tokenizer: Any,
    questions: list[str],
    query_ids: list[list[int]],
    lengths: list[int],
    ppo_cfg: Any,
    device: torch.device,
    keep_hidden: bool = False,
) -> Rollout:
    """Sample responses for a batch of prompts with the article's sampling settings.

    ``keep_hidden``: also keep, from each generation step, the final-norm output at the position
    that predicts the next token (a forward hook: one (B, H) row a step, not the per-layer states
    ``output_hidden_states`` would hold). Step 0 (the prompt) predicts response token 0 from the
    last query column, step t the token t from token t - 1: exactly the (B, R, H) states a forward
    over [query | response] gives at columns Q-1 .. Q+R-2 (``policy.response_hidden``), up to
    float rounding (incremental vs whole-sequence matmuls).
    """
    pad_id = tokenizer.pad_token_id
    eos_id = tokenizer.eos_token_id
    q_ids, q_mask = left_pad(query_ids, pad_id)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    max_len = max(lengths)
    gen_kwargs = dict(
        max_new_tokens=max_len,
        do_sample=True,
        top_k=int(ppo_cfg.top_k),
        top_p=float(ppo_cfg.top_p),
        temperature=float(ppo_cfg.temperature),
        pad_token_id=pad_id,
        use_cache=True,
    )
    if not ppo_cfg.stop_at_eos:
        # Keep sampling past EOS, from the unmodified distribution (not min_new_tokens, which masks
        # EOS out of it): every response reaches its sampled length.
        gen_kwargs["eos_token_id"] = None
    was_training = model.training
    model.eval()
    steps: list[torch.Tensor] = []
    hook = None
    if keep_hidden:
        hook = decoder_of(model).norm.register_forward_hook(lambda _m, _i, out: steps.append(out[:, -1].detach()))
    try:
        with weight_major_decode(model):  # few-row products as (W x^T)^T on CPU (faster than F.linear there)
            out = model.generate(input_ids=q_ids, attention_mask=q_mask, **gen_kwargs)  # (B, Q+R')
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    response_ids = out[:, q_ids.shape[1] :]  # (B, R') R' <= max_len when all rows stop early
    if response_ids.shape[1] < max_len:
        fill = torch.full((len(lengths), max_len - response_ids.shape[1]), pad_id, device=device)
        response_ids = torch.cat([response_ids, fill], 1)
    r_mask = response_mask_from(response_ids.cpu(), lengths, eos_id, bool(ppo_cfg.stop_at_eos)).to(device)
    response_ids = torch.where(r_mask.bool(), response_ids, torch.full_like(response_ids, pad_id))
    responses = [tokenizer.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(response_ids, r_mask)]
    hidden = None
    if keep_hidden:
        hidden = torch.stack(steps[:max_len], 1)  # (B, R', H): one state per generated token
        if hidden.shape[1] < max_len:  # generation stopped early: the rest is masked out anyway
            B, done, H = hidden.shape
            hidden = torch.cat([hidden, hidden.new_zeros(B, max_len - done, H)], 1)
    ended = torch.zeros(len(lengths), dtype=torch.bool)
    if ppo_cfg.stop_at_eos and eos_id is not None:
        last = (r_mask.sum(1) - 1).clamp(min=0).cpu()  # index of each response's last counted token
        ended = (r_mask.sum(1).cpu() > 0) & (response_ids.cpu().gather(1, last.unsqueeze(1)).squeeze(1) == eos_id)
    return Rollout(
        questions=list(questions),
        query_ids=q_ids,
        response_ids=response_ids,
        input_ids=torch.cat([q_ids, response_ids], 1),
        attention_mask=torch.cat([q_mask, r_mask], 1),
        response_mask=r_mask,
        responses=responses,
        ended=ended,
        hidden=hidden,
    )
