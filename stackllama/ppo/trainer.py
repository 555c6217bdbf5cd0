"""Our KL-penalized PPO for language models (TRL removed its PPOTrainer in 1.13).

One ``step()`` is the whole algorithm, top to bottom:

1. rollout    sample B prompts, generate responses (lengths from the length sampler)
2. score      reward model on (question, response); minus ``reward_baseline``
3. reference  log-probs of the same tokens with the LoRA adapters switched off
4. rewards    r_t = -beta * KL_t on every response token, + score on the last one
5. GAE        advantages and returns from the value head (gamma, lambda), whitened
6. optimize   ``ppo_epochs`` passes of clipped policy loss + vf_coef * clipped value loss
7. KL control beta fixed (``ppo.kl_coef``) or adapted toward ``ppo.target``

Shapes: B episodes, R response tokens, V vocabulary. Every loss and statistic is masked
to real response tokens (no padding, nothing after EOS).

Data-parallel (``accelerate launch`` / torchrun / submitit tasks): each process rolls out
its own B prompts, scores them and computes its advantages; gradients are averaged over
processes before every optimizer step, and the KL controller and logged statistics use
the means over processes, so one step consumes B x world_size episodes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from stackllama import distributed, precision
from stackllama.data.prompts import PromptSource
from stackllama.memory import release_free_memory, set_malloc_mmap_threshold
from stackllama.models.loader import is_quantized
from stackllama.ppo import core
from stackllama.ppo.checkpoint import load_checkpoint, rng_state, save_checkpoint
from stackllama.ppo.policy import PolicyWithValueHead
from stackllama.ppo.rollout import Rollout, generate_rollout

log = logging.getLogger(__name__)


def make_kl_controller(cfg: Any) -> core.FixedKLController | core.AdaptiveKLController:
    """``ppo.kl_coef`` set -> fixed beta; else the article's adaptive controller."""
    if cfg.kl_coef is not None:
        return core.FixedKLController(float(cfg.kl_coef))
    return core.AdaptiveKLController(float(cfg.init_kl_coef), float(cfg.target), float(cfg.horizon))


Scorer = Callable[[list[str], list[str]], torch.Tensor]


@dataclass
class TrainBatch:
    """What one PPO step's epochs train on: the rollout and its no-grad figures, fixed while the
    policy moves (B episodes, R response tokens)."""

    ro: Rollout
    old_logprobs: torch.Tensor  # (B, R) log pi_old(a_t | s_t)
    old_values: torch.Tensor  # (B, R) V_old(s_t)
    advantages: torch.Tensor  # (B, R) A_t
    returns: torch.Tensor  # (B, R) the value head's targets
    mask: torch.Tensor  # (B, R) 1 on response tokens
    ref_logprobs: torch.Tensor  # (B, R) log pi_ref(a_t | s_t)
    critic_only: bool  # critic warm-up: only the value head trains


def make_optimizer(cfg: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``ppo.optimizer``: torch's AdamW, or bitsandbytes' AdamW8bit (8-bit moments)."""
    lr = float(cfg.learning_rate)
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr)
    # fused: one kernel for all parameters (an optimizer step went from ~100 ms to ~6 ms on CPU)
    return torch.optim.AdamW(params, lr=lr, fused=True)


def num_steps(cfg: Any) -> int:
    """PPO steps in a run: ceil(total_episodes / batch_size), as TRL rounds its episode count."""
    return -(-int(cfg.total_episodes) // int(cfg.batch_size))


def micro_batch_size(cfg: Any) -> int:
    """Episodes per forward/backward pass (``ppo.micro_batch_size``; None: the whole mini-batch)."""
    return int(cfg.micro_batch_size or cfg.mini_batch_size)


class PPOTrainer:
    """Runs ``num_steps(cfg)`` PPO steps on ``policy``; checkpoints into ``checkpoint_dir``."""

    def __init__(
        self,
        cfg: Any,
        policy: PolicyWithValueHead,
        tokenizer: Any,
        scorer: Scorer,
        prompts: PromptSource,
        device: torch.device,
        seed: int,
        checkpoint_dir: Path,
        tracker: Any = None,
        gold_scorer: Scorer | None = None,
        samples_path: Path | None = None,
        mixed_precision: str = "no",
        heldout: PromptSource | None = None,
        heldout_tokens: int = 0,
    ):
        self.cfg = cfg
        self.heldout, self.heldout_tokens = heldout, int(heldout_tokens)  # ppo.eval_every's fixed questions
        self.heldout_rows: list[dict[str, float]] = []
        self.heldout_seconds = 0.0  # this process's time on the curve (not training: left out of ppo/ step times)
        self.seed = seed
        self.mixed_precision = mixed_precision
        self.policy = policy
        self.tokenizer = tokenizer
        self.scorer = scorer
        self.prompts = prompts
        self.device = device
        self.tracker = tracker
        self.gold_scorer = gold_scorer
        self.samples_path = samples_path
        self.checkpoint_dir = Path(checkpoint_dir)
        self.dist = distributed.current()
        if cfg.batch_size % cfg.mini_batch_size or cfg.mini_batch_size % micro_batch_size(cfg):
            raise ValueError("need batch_size % mini_batch_size == 0 and mini_batch_size % micro_batch_size == 0")
        self.optimizer = make_optimizer(cfg, policy.trainable_parameters())
        self.kl_ctl = make_kl_controller(cfg)
        if device.type == "cpu":
            set_malloc_mmap_threshold(cfg.malloc_mmap_threshold_mb)
        self.length_sampler = core.LengthSampler(int(cfg.min_new_tokens), int(cfg.max_new_tokens), seed=seed)
        self.score_moments = core.RunningMoments()
        self.generator = torch.Generator().manual_seed(seed)
        self.step_idx = 0
        self.skipped_batches = 0
        self.skipped_nonfinite = 0  # micro-batches and updates dropped for a NaN/inf loss, ratio or gradient norm
        self.nonfinite_streak = 0  # mini-batches in a row with no update because of one (ppo.max_nonfinite_skips)
        self.history: list[dict[str, float]] = []
        self.logprobs_from_rollout = bool(cfg.logprobs_from_rollout) and self._rollout_states_exact()

    # ------------------------------------------------------------------ one PPO step
    def step(self) -> dict[str, float]:
        cfg, policy = self.cfg, self.policy
        B = int(cfg.batch_size)
        t_start = time.perf_counter()

        # 1. Rollout: B / k prompts, each sampled k = samples_per_prompt times (consecutive rows)
        k = int(cfg.samples_per_prompt)
        idx = [i for i in self.prompts.next_batch(B // k) for _ in range(k)]
        questions = [self.prompts.questions[i] for i in idx]
        lengths = [self.length_sampler() for _ in range(B)]
        with self._autocast():
            ro: Rollout = generate_rollout(
                policy.generation_model(),
                self.tokenizer,
                questions,
                [self.prompts.query_ids[i] for i in idx],
                lengths,
                cfg,
                self.device,
                keep_hidden=self.logprobs_from_rollout,
            )
        mask = ro.response_mask.float()  # (B, R)
        self._between_phases()
        t_rollout = time.perf_counter()

        # 2. Score: reward model on (question, response), then the score PPO optimizes --
        raw_scores = self.scorer(ro.questions, ro.responses).float().cpu()  # (B,)
        scores = self._shape_scores(raw_scores, ro.ended)  # (B,)
        t_score = time.perf_counter()

        # 3. Old log-probs, values, entropy (policy) and reference log-probs ---------
        old_logprobs, old_values, ref_logprobs, entropy = self._forward_no_grad(ro)  # each (B, R)
        mask = mask.to(old_logprobs.device)
        scores = scores.to(old_logprobs.device)
        t_forward = time.perf_counter()

        # 4. Per-token rewards: r_t = -beta * KL_t ; r_T += score ----------------------
        beta = float(self.kl_ctl.value)
        beta_in_reward = 0.0 if cfg.kl_in_loss else beta  # kl_in_loss: the KL term is in the loss (step 6)
        rewards, kl = core.compute_rewards(scores, old_logprobs, ref_logprobs, mask, beta_in_reward, cfg.kl_estimator)

        # 5. Advantages. gae: delta_t = r_t + gamma V_{t+1} - V_t ; A_t = delta_t + gamma lam A_{t+1}
        #    rloo: A_i = R_i - mean of the other k-1 ; grpo: A_i = (R_i - mean_k) / std_k
        advantages, returns = core.compute_advantages(
            str(cfg.advantage), old_values, rewards, mask, float(cfg.gamma), float(cfg.lam), k
        )
        if cfg.whiten_advantages:
            advantages = core.masked_whiten(advantages, mask)

        # 6. PPO epochs over shuffled mini-batches ------------------------------------
        critic_only = self.step_idx < int(cfg.critic_warmup_steps)
        batch = TrainBatch(ro, old_logprobs, old_values, advantages, returns, mask, ref_logprobs, critic_only)
        train_stats = self._optimize(batch)
        t_optimize = time.perf_counter()

        # 7. KL control: beta <- beta * (1 + clip(KL/target - 1, -0.2, 0.2) * B/horizon)
        seq_kl = (kl * mask).sum(1)  # (B,) KL of each response to the reference
        world = self.dist.world_size
        self.kl_ctl.update(distributed.all_reduce_mean(float(seq_kl.mean())), B * world)  # n = episodes, all ranks
        self.step_idx += 1

        stats = {
            "env/reward_mean": float(raw_scores.mean()),  # the reward model's own score
            "env/reward_std": float(raw_scores.std()) if B > 1 else 0.0,
            "env/score_mean": float(scores.mean()),  # what PPO optimizes (normalized, penalized, clipped)
            "env/score_std": float(scores.std()) if B > 1 else 0.0,
            "env/frac_ended_eos": float(ro.ended.float().mean()),
            "env/episodes": float(B),
            "objective/kl": float(seq_kl.mean()),
            "objective/kl_per_token": float(core.masked_mean(kl, mask)),
            "objective/kl_coef": beta,
            "objective/entropy": float(core.masked_mean(entropy, mask)),
            "ppo/mean_non_score_reward": float(((rewards * mask).sum(1) - scores).mean()),
            "ppo/returns/mean": float(core.masked_mean(returns, mask)),
            "ppo/returns/var": float(core.masked_var(returns, mask)),
            "ppo/val/mean": float(core.masked_mean(old_values, mask)),
            "ppo/val/var_explained": float(core.explained_variance(old_values, returns, mask)),
            "ppo/skipped_batches": float(self.skipped_batches),
            "ppo/skipped_nonfinite": float(self.skipped_nonfinite),
            "tokens/response_len_mean": float(mask.sum(1).mean()),
            "tokens/query_len_mean": float(np.mean([len(self.prompts.query_ids[i]) for i in idx])),
            "time/ppo/rollout": t_rollout - t_start,
            "time/ppo/score": t_score - t_rollout,
            "time/ppo/forward": t_forward - t_score,
            "time/ppo/optimize": t_optimize - t_forward,
            "time/ppo/step": time.perf_counter() - t_start,
            "ppo/lr": float(self.optimizer.param_groups[0]["lr"]),  # constant, as in the article
            **train_stats,
        }
        ids_list = [r[m.bool()].tolist() for r, m in zip(ro.response_ids.cpu(), ro.response_mask.cpu())]
        stats.update({f"hack/{k}": v for k, v in core.repetition_stats(ids_list, ro.responses).items()})
        gold = None
        if self.gold_scorer is not None:
            gold = torch.as_tensor(self.gold_scorer(ro.questions, ro.responses), dtype=torch.float32)
            stats["gold/score_mean"] = float(gold.mean())
            stats["gold/score_std"] = float(gold.std()) if B > 1 else 0.0
        stats = distributed.mean_over_ranks(stats)  # the step's figures over all processes' episodes
        stats["time/ppo/episodes_per_second"] = B * world / stats["time/ppo/step"]
        stats["env/episodes"] = float(B * world)  # per-rank stds are averaged: the pooled figures are approximate
        if self.dist.is_main:
            self._maybe_log_samples(ro, scores, seq_kl, gold)
        return stats

    # ------------------------------------------------------------------ curves along training
    @torch.no_grad()
    def evaluate_heldout(self) -> dict[str, float]:
        """The current policy on the fixed held-out questions: one response each (heldout_tokens
        long, the same sampling seed every time, outside the training RNG streams), its raw RM
        score, gold score and KL(pi || pi_ref) per response, estimated as sum_t k3_t with
        k3 = (r - 1) - log r, r = pi_ref(y_t) / pi(y_t) on the policy's own samples: unbiased like k1
        and never negative (sqrt(KL) is the curve's x axis). Appends the row to ``heldout_rows``."""
        hp, cfg = self.heldout, self.cfg
        started = time.perf_counter()
        n = len(hp.questions)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # training's global RNG state is restored after
            torch.manual_seed(self.seed + 7919)
            with self._autocast():
                ro = generate_rollout(
                    self.policy.generation_model(),
                    self.tokenizer,
                    list(hp.questions),
                    list(hp.query_ids),
                    [self.heldout_tokens] * n,
                    cfg,
                    self.device,
                    keep_hidden=self.logprobs_from_rollout,
                )
            logprobs, _, ref_logprobs, _ = self._forward_no_grad(ro)  # (n, R) each
        mask = ro.response_mask.float().to(logprobs.device)
        kl = (core.kl_estimate(logprobs, ref_logprobs, "k3") * mask).sum(1)  # (n,) per response, >= 0
        scores = self.scorer(ro.questions, ro.responses).float().cpu()  # (n,) raw, as the eval stage scores
        row = {
            "step": float(self.step_idx),
            "episodes": float(self.step_idx * int(cfg.batch_size)),
            "reward_mean": float(scores.mean()),
            "reward_stderr": float(scores.std() / math.sqrt(n)) if n > 1 else 0.0,
            "kl_mean": float(kl.mean()),
            "questions": float(n),
        }
        if self.gold_scorer is not None:
            gold = torch.as_tensor(self.gold_scorer(ro.questions, ro.responses), dtype=torch.float32)
            row["gold_mean"] = float(gold.mean())
            row["gold_stderr"] = float(gold.std() / math.sqrt(n)) if n > 1 else 0.0
        self.heldout_rows.append(row)
        self._between_phases()
        self.heldout_seconds += time.perf_counter() - started
        return row

    def _heldout_due(self, total: int) -> bool:
        every = int(self.cfg.eval_every)
        if self.heldout is None or every <= 0:
            return False
        done = {int(r["step"]) for r in self.heldout_rows}
        return self.step_idx not in done and (self.step_idx % every == 0 or self.step_idx == total)

    # ------------------------------------------------------------------ pieces
    def _shape_scores(self, raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Raw RM scores (B,) -> the scores PPO optimizes (B,): baseline, scale, EOS penalty, clip."""
        cfg = self.cfg
        scores = raw - float(cfg.reward_baseline)  # s = r - b
        mode = str(cfg.score_normalize)
        if mode == "running" or (mode == "sft" and self.step_idx == 0):
            # "sft": only the first step's scores, which the untrained policy (= the SFT model) earned
            every_rank = [x for part in distributed.gather_objects(scores.tolist()) for x in part]
            self.score_moments.update(torch.tensor(every_rank))  # the same moments on every rank
        if mode in ("sft", "running"):
            scores = (scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)  # (s - mu) / sigma
        if cfg.stop_at_eos and cfg.missing_eos_penalty is not None:
            scores = scores - float(cfg.missing_eos_penalty) * (~ended).float()  # s -= penalty without EOS
        if cfg.score_clip is not None:
            scores = scores.clamp(-float(cfg.score_clip), float(cfg.score_clip))
        return scores

    def _rollout_states_exact(self) -> bool:
        """Whether generation's hidden states equal a whole-sequence forward's up to fp32 rounding:
        fp32 weights and no autocast (bf16 rounds differently in the two), no quantized base (int8
        picks its outlier columns from the whole batch of activations)."""
        lm = self.policy._causal_lm()
        fp32_head = self.policy.output_head().weight.dtype == torch.float32
        return self.mixed_precision == "no" and not is_quantized(lm) and fp32_head

    def _autocast(self) -> Any:
        """Mixed precision for the backbone passes. The LM head and log-softmax stay outside it, in
        the weights' dtype: bf16 logits are rounded by up to ~0.06 at typical magnitudes, enough
        to blur the PPO ratio exp(logp - logp_old) the clip range (0.2) acts on."""
        return precision.autocast(self.mixed_precision, self.device)

    def _between_phases(self) -> None:
        """After the rollout, each no-grad mini-batch and each optimisation epoch (see release_free_memory)."""
        if self.device.type == "cpu" and self.cfg.malloc_trim:
            release_free_memory()

    @torch.no_grad()
    def _forward_no_grad(self, ro: Rollout) -> tuple[torch.Tensor, ...]:
        """Policy log-probs/values/entropy and reference log-probs, in mini-batch chunks."""
        out: dict[str, list[torch.Tensor]] = defaultdict(list)
        n, chunk = int(self.cfg.mini_batch_size), int(self.cfg.head_chunk_size)
        T = float(self.cfg.temperature)  # log-probs of softmax(logits / T), the sampling distribution
        with self.policy.reference_resident():  # the reference's weights, when offloaded between steps
            for s in range(0, ro.input_ids.shape[0], n):
                self._forward_no_grad_chunk(ro, out, s, n, chunk, T)
        # kept for the PPO epochs: the frozen layers' output does not change while the adapters train
        ro.prefix = torch.cat(out["prefix"]) if out["prefix"] else None
        ro.hidden = None  # used: the epochs' forwards run with gradients
        return tuple(torch.cat(out[k]).float() for k in ("logprobs", "values", "ref", "entropy"))

    def _forward_no_grad_chunk(
        self, ro: Rollout, out: dict[str, list[torch.Tensor]], s: int, n: int, chunk: int, T: float
    ) -> None:
        """Episodes s : s + n of ``_forward_no_grad``: their tensors appended to ``out``."""
        Q = ro.query_len
        ids, att = ro.input_ids[s : s + n], ro.attention_mask[s : s + n]
        resp = ro.response_ids[s : s + n]  # (b, R)
        with self._autocast():
            prefix = self.policy.prefix(ids, att, Q)  # (b, Q+R, H) after the frozen layers, or None
            if ro.hidden is not None:  # the states generation computed (ppo.logprobs_from_rollout)
                hidden, head = ro.hidden[s : s + n], self.policy.output_head()  # (b, R, H), LM head
            else:
                hidden, head, _ = self.policy(ids, att, Q, with_values=False, prefix=prefix)  # (b, R, H)
        values = self.policy.values(hidden)  # (b, R), outside autocast as in training
        logprobs, entropy = core.logprobs_from_hidden(hidden, head, resp, chunk, with_entropy=True, temperature=T)
        del hidden
        with self._autocast():
            ref_hidden, ref_head = self.policy.reference_hidden(ids, att, Q, prefix=prefix)  # (b, R, H)
        ref_logprobs, _ = core.logprobs_from_hidden(ref_hidden, ref_head, resp, chunk, temperature=T)
        for key, value in (("logprobs", logprobs), ("values", values), ("ref", ref_logprobs), ("entropy", entropy)):
            out[key].append(value)
        if prefix is not None:
            out["prefix"].append(prefix)
        del ref_hidden
        self._between_phases()

    def _micro_batch_loss(self, b: TrainBatch, i: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of episodes ``i`` (m of them): L = L_clip + vf_coef * L_vf, or vf_coef * L_vf alone in
        critic warm-up (then the backbone runs without grad: only the value head learns)."""
        cfg = self.cfg
        ro, critic_only, mask = b.ro, b.critic_only, b.mask
        grad = contextlib.nullcontext() if not critic_only else torch.no_grad()
        prefix = ro.prefix[i] if ro.prefix is not None else None  # (m, Q+R, H) from the no-grad pass
        with grad, self._autocast():
            hidden, head, _ = self.policy(
                ro.input_ids[i], ro.attention_mask[i], ro.query_len, with_values=False, prefix=prefix
            )  # (m, R, H)
        values = self.policy.values(hidden).float()  # (m, R)
        vf_loss, vf_stats = core.value_loss(values, b.old_values[i], b.returns[i], mask[i], float(cfg.cliprange_value))
        stats = {
            "ppo/loss/value": vf_loss,
            "ppo/val/clipfrac": vf_stats["clipfrac"],
            "ppo/val/error": vf_stats["error"],
        }
        if critic_only:
            return float(cfg.vf_coef) * vf_loss, stats
        logprobs, _ = core.logprobs_from_hidden(
            hidden, head, ro.response_ids[i], int(cfg.head_chunk_size), temperature=float(cfg.temperature)
        )
        pg_loss, pg_stats = core.policy_loss(
            logprobs.float(),
            b.old_logprobs[i],
            b.advantages[i],
            mask[i],  # (m, R)
            float(cfg.cliprange),
            cfg.dual_clip,
        )
        vf_coef = float(cfg.vf_coef) if cfg.advantage == "gae" else 0.0  # group baselines need no critic
        loss = pg_loss + vf_coef * vf_loss  # L = L_clip + c_vf * L_vf
        if cfg.kl_in_loss:  # GRPO: L += beta * mean_t KL_t(pi_theta || pi_ref), on the current policy
            kl_loss = core.masked_mean(core.kl_estimate(logprobs.float(), b.ref_logprobs[i], cfg.kl_estimator), mask[i])
            loss = loss + float(self.kl_ctl.value) * kl_loss
            stats["ppo/loss/kl"] = kl_loss
        stats.update(
            {
                "ppo/loss/policy": pg_loss,
                "ppo/loss/total": loss,
                "ppo/policy/approxkl": pg_stats["approxkl"],
                "ppo/policy/policykl": pg_stats["policykl"],
                "ppo/policy/clipfrac": pg_stats["clipfrac"],
                "ppo/policy/ratio_mean": pg_stats["ratio_mean"],
                "ppo/policy/dual_clipfrac": pg_stats["dual_clipfrac"],
            }
        )
        return loss, stats

    def _optimize(self, batch: TrainBatch) -> dict[str, float]:
        """``ppo_epochs`` passes over the batch in shuffled mini-batches of ``mini_batch_size``
        episodes, one optimizer step each; an epoch whose mean approx KL exceeds 1.5 x target_kl
        ends the step's epochs."""
        cfg = self.cfg
        B, mb = batch.ro.input_ids.shape[0], int(cfg.mini_batch_size)
        critic_only = batch.critic_only
        sums: dict[str, float] = defaultdict(float)
        count = 0
        early_stop = 0.0
        self.policy.eval()  # dropout off in updates too (N+ detail): ratios start at exactly 1
        for _epoch in range(int(cfg.ppo_epochs)):
            perm = torch.randperm(B, generator=self.generator).to(batch.ro.input_ids.device)
            epoch_kl = []
            for start in range(0, B, mb):
                for stats in self._update(perm[start : start + mb], batch):
                    for k, v in stats.items():
                        sums[k] += float(v.detach()) if torch.is_tensor(v) else float(v)
                    count += 1
                    if not critic_only:
                        epoch_kl.append(float(stats["ppo/policy/approxkl"]))
            epoch_approxkl = float(np.mean(epoch_kl)) if epoch_kl else 0.0
            if self.dist.is_distributed:  # all ranks stop together
                epoch_approxkl = distributed.all_reduce_mean(epoch_approxkl)
            self._between_phases()
            if cfg.target_kl is not None and epoch_approxkl > 1.5 * float(cfg.target_kl):
                early_stop = 1.0  # policy moved too far from the rollout policy: stop this step's epochs
                break
        # Free the gradients (weights-sized in full fine-tuning) now, not at the next step's first update:
        # held, they sit through its rollout, scoring and no-grad pass (with ppo.offload_ref_reward, next
        # to the reference). Freeing and trimming them after every update instead saved ~100 MB more
        # of SmolLM2's peak but cost ~12% of full fine-tuning's speed (fresh pages each update).
        self.optimizer.zero_grad(set_to_none=True)
        self._between_phases()
        stats = {k: v / max(count, 1) for k, v in sums.items()}
        stats["ppo/early_stop"] = early_stop
        stats["ppo/critic_warmup"] = float(critic_only)
        return stats

    def _update(self, idx: torch.Tensor, batch: TrainBatch) -> list[dict[str, Any]]:
        """One optimizer step on the mini-batch ``idx`` (mini_batch_size episodes): the gradient of
        its micro-batches (micro_batch_size episodes each) accumulated, clipped to max_grad_norm.
        A micro-batch whose mean ratio exceeds ratio_threshold, or whose loss or ratio is NaN/inf,
        is left out; an infinite gradient norm drops the update. Returns the kept micro-batches' stats."""
        cfg = self.cfg
        critic_only = batch.critic_only
        micro = micro_batch_size(cfg)
        passes = len(idx) // micro  # the loss of each pass is divided by it: the mean over the mini-batch
        params = self.policy.trainable_parameters()
        self.optimizer.zero_grad(set_to_none=True)
        kept: list[dict[str, Any]] = []
        nonfinite = 0  # micro-batches / updates dropped for NaN or inf
        for m_start in range(0, len(idx), micro):
            loss, stats = self._micro_batch_loss(batch, idx[m_start : m_start + micro])
            ratio = float(stats["ppo/policy/ratio_mean"]) if not critic_only else 1.0
            if not ratio <= float(cfg.ratio_threshold):  # written so that a NaN ratio is skipped too
                # The probability ratio exploded: this micro-batch would wreck the policy.
                self.skipped_batches += 1
                nonfinite += not math.isfinite(ratio)
                continue
            if not torch.isfinite(loss):
                nonfinite += 1  # a NaN/inf loss would put NaN into every trained weight
                continue
            (loss / passes).backward()
            kept.append(stats)
        stepped = bool(kept)
        if self.dist.is_distributed:  # every rank steps, with the mean gradient, if any rank has one
            stepped = distributed.all_reduce_sum(int(stepped)) > 0
            nonfinite = int(distributed.all_reduce_sum(nonfinite))  # the same count (and decision) everywhere
            if stepped:
                distributed.average_gradients(params)
        if stepped:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, float(cfg.max_grad_norm))
            if torch.isfinite(grad_norm):  # ranks hold the same mean gradient: the same decision
                self.optimizer.step()
            else:  # clipping by an infinite norm turns every gradient into NaN: skip the update
                self.optimizer.zero_grad(set_to_none=True)
                nonfinite += 1
                stepped = False
        self._count_update(stepped, nonfinite)
        return kept

    def _count_update(self, stepped: bool, nonfinite: int) -> None:
        """Count the micro-batches and updates dropped for a NaN/inf loss, ratio or gradient norm; end
        the run after ``ppo.max_nonfinite_skips`` mini-batches in a row updated nothing because of one
        (an update that lands resets the count)."""
        self.skipped_nonfinite += int(nonfinite)
        if stepped:
            self.nonfinite_streak = 0
            return
        if not nonfinite:
            return  # no update for a finite reason (every ratio above the threshold)
        self.nonfinite_streak += 1
        log.warning(
            "PPO step %d: skipped an update with a non-finite loss or gradient (%d in a row, %d in all)",
            self.step_idx + 1,
            self.nonfinite_streak,
            self.skipped_nonfinite,
        )
        limit = int(self.cfg.max_nonfinite_skips)
        if self.nonfinite_streak >= limit:
            raise FloatingPointError(
                f"PPO diverged at step {self.step_idx + 1}: {self.nonfinite_streak} updates in a row had a NaN/inf "
                f"loss or gradient norm (ppo.max_nonfinite_skips={limit}); nothing is published. Lower "
                f"ppo.learning_rate (now {self.cfg.learning_rate})"
            )

    def _maybe_log_samples(
        self, ro: Rollout, scores: torch.Tensor, seq_kl: torch.Tensor, gold: torch.Tensor | None
    ) -> None:
        every = int(self.cfg.sample_every)
        if every <= 0 or (self.step_idx % every and self.step_idx != 1):
            return
        n = min(int(self.cfg.num_samples), len(ro.responses))
        rows = []
        for i in range(n):
            row = [
                self.step_idx,
                ro.questions[i],
                ro.responses[i],
                round(float(scores[i]), 4),
                round(float(seq_kl[i]), 4),
            ]
            if gold is not None:
                row.append(round(float(gold[i]), 4))
            rows.append(row)
        columns = ["step", "query", "response", "reward", "kl"] + (["gold"] if gold is not None else [])
        if self.tracker is not None:
            self.tracker.log_table("ppo/samples", columns, rows, step=self.step_idx)
        if self.samples_path is not None:
            with open(self.samples_path, "a") as fh:
                for row in rows:
                    fh.write(json.dumps(dict(zip(columns, row))) + "\n")

    # ------------------------------------------------------------------ loop + state
    def state(self) -> dict[str, Any]:
        return {
            "step": self.step_idx,
            "skipped_batches": self.skipped_batches,
            "skipped_nonfinite": self.skipped_nonfinite,
            "nonfinite_streak": self.nonfinite_streak,
            "kl_ctl": self.kl_ctl.state_dict(),
            "length_sampler": self.length_sampler.state_dict(),
            "prompts": self.prompts.state_dict(),
            "score_moments": self.score_moments.state_dict(),
            "generator": self.generator.get_state(),
            "history": self.history,
            "heldout": self.heldout_rows,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.step_idx = int(state["step"])
        self.skipped_batches = int(state["skipped_batches"])
        self.skipped_nonfinite = int(state.get("skipped_nonfinite", 0))  # absent in older checkpoints
        self.nonfinite_streak = int(state.get("nonfinite_streak", 0))
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.length_sampler.load_state_dict(state["length_sampler"])
        self.prompts.load_state_dict(state["prompts"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        self.heldout_rows = list(state.get("heldout", []))

    def resume(self) -> int:
        """Load the latest checkpoint when present; returns the step resumed from (0 if none)."""
        state = load_checkpoint(
            self.checkpoint_dir,
            self.policy,
            self.optimizer,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        if state is None:
            return 0
        self.load_state(state)
        log.info("Resumed PPO from checkpoint at step %d", self.step_idx)
        return self.step_idx

    def save(self) -> None:
        """Rank 0 writes the (identical) weights and optimizer with every rank's loop and RNG state."""
        per_rank = distributed.gather_objects(
            {"loop": self.state(), "rng": rng_state()}
        )  # collective: every rank calls save()
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_dir, self.step_idx, self.policy, self.optimizer, per_rank)
        distributed.barrier()  # nobody reads or overwrites it before it is complete

    def _log_heldout(self, row: dict[str, float]) -> None:
        if self.tracker is not None and self.dist.is_main:
            self.tracker.log({f"heldout/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def train(self, on_step: Callable[[dict[str, float]], None] | None = None) -> list[dict[str, float]]:
        total = num_steps(self.cfg)
        bar = tqdm(total=total, initial=self.step_idx, desc="PPO", dynamic_ncols=True, disable=not self.dist.is_main)
        if self._heldout_due(total):  # the curve's first point: the policy before any update
            self._log_heldout(self.evaluate_heldout())
        while self.step_idx < total:
            stats = self.step()
            stats["ppo/step"] = self.step_idx
            if self._heldout_due(total):
                stats.update({f"heldout/{k}": v for k, v in self.evaluate_heldout().items() if k != "step"})
            self.history.append(stats)
            if self.tracker is not None and self.dist.is_main and self.step_idx % max(int(self.cfg.log_every), 1) == 0:
                self.tracker.log(stats, step=self.step_idx)
            bar.set_postfix(
                reward=f"{stats['env/reward_mean']:.3f}",
                kl=f"{stats['objective/kl']:.3f}",
                beta=f"{stats['objective/kl_coef']:.3f}",
            )
            bar.update(1)
            if on_step is not None:
                on_step(stats)
            if int(self.cfg.save_every) > 0 and self.step_idx % int(self.cfg.save_every) == 0:
                self.save()
        bar.close()
        return self.history


def window_stats(rows: list[dict[str, float]], mean_key: str, std_key: str) -> tuple[float, float]:
    """Mean and standard error over every episode of ``rows`` (steps), from each step's mean, std
    and episode count (``env/episodes``): the pooled variance
    var = [sum (n_i - 1) s_i^2 + sum n_i (m_i - M)^2] / (N - 1), stderr = sqrt(var / N)."""
    parts = [(r[mean_key], r.get(std_key, 0.0), r.get("env/episodes", 1.0)) for r in rows if mean_key in r]
    if not parts:
        return float("nan"), float("nan")
    n = np.array([p[2] for p in parts], dtype=float)
    m = np.array([p[0] for p in parts], dtype=float)
    sd = np.array([p[1] for p in parts], dtype=float)
    total = n.sum()
    grand = float((n * m).sum() / total)
    if total < 2:
        return grand, float("nan")
    var = (((n - 1) * sd**2).sum() + (n * (m - grand) ** 2).sum()) / (total - 1)
    return grand, float(math.sqrt(var / total))


def summarize(history: list[dict[str, float]]) -> dict[str, float]:
    """Run-level figures: means (and their standard errors over episodes) over the first and the
    last 10% of steps (at least one step each)."""
    if not history:
        return {"ppo/steps": 0}
    k = max(1, int(round(0.1 * len(history))))
    first, last = history[:k], history[-k:]

    def mean(rows, key):
        vals = [r[key] for r in rows if key in r]
        return float(np.mean(vals)) if vals else float("nan")

    out = {
        "ppo/steps": len(history),
        "objective/kl_start": mean(first, "objective/kl"),
        "objective/kl_end": mean(last, "objective/kl"),
        "objective/kl_coef_end": history[-1]["objective/kl_coef"],
        "ppo/skipped_batches": history[-1]["ppo/skipped_batches"],
        "ppo/skipped_nonfinite": history[-1].get("ppo/skipped_nonfinite", 0.0),
        "hack/frac_hacking_end": mean(last, "hack/frac_hacking"),
        "time/ppo/step_mean": mean(history, "time/ppo/step"),
        "time/ppo/episodes_per_second": mean(history, "time/ppo/episodes_per_second"),
    }
    series = [("ppo/reward_mean", "env/reward_mean", "env/reward_std")]
    if "gold/score_mean" in history[0]:
        series.append(("gold/score", "gold/score_mean", "gold/score_std"))
    for name, mean_key, std_key in series:
        for when, rows in (("start", first), ("end", last)):
            value, stderr = window_stats(rows, mean_key, std_key)
            out[f"{name}_{when}"] = value
            out[f"{name}_{when}_stderr"] = stderr
    return out
