"""Structured configs: the typed schema every YAML file in ``conf/`` is merged into.

Hydra validates each composed config against these dataclasses, so an unknown key
(``sft.learnign_rate=1``) or a wrong type (``ppo.batch_size=big``) fails before any
model loads, naming the key. Defaults follow the StackLlama article unless noted; the
embedded CPU default shrinks them through ``conf/experiment/embedded.yaml``.

Valid ranges live on the fields themselves (``metadata=positive()``, ``at_least(1)``,
``in_range(0, 1)``, ...). ``validate(cfg)`` (run by ``stackllama.task.run_task`` before any
model loads) walks every field of the composed config against them, rejects keys the
schema does not know (``+sft.learnign_rate=1``: Hydra's ``+`` adds keys even to typed
nodes), checks the string choices in ``CHOICES`` and the cross-field rules, and reports
every problem at once, each naming the key, its value and what is valid.
"""

from __future__ import annotations

import difflib
import functools
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

STAGES = ("sft", "rm", "ppo", "dpo", "eval", "all")

# The pipeline graph, in one place: stage -> {input: the setting that may name that input's model
# instead of its artifact (None: always the artifact)}. Each input is the artifact of the stage of
# the same name. stackllama/pipeline.py resolves it; artifacts.key_material keys by it.
PIPELINE: dict[str, dict[str, Optional[str]]] = {
    "sft": {},
    "rm": {"sft": "rm.model_path"},
    "ppo": {"sft": "ppo.policy_path", "rm": "ppo.reward_model_path"},
    "dpo": {"sft": "dpo.policy_path"},
    # "policy": the stage named by eval.policy (ppo | dpo), the model under test
    "eval": {"policy": "eval.policy_path", "sft": "ppo.policy_path", "rm": "ppo.reward_model_path"},
}
POLICY_STAGES = ("ppo", "dpo")  # what eval.policy may name


# ----------------------------------------------------------------------------- valid ranges


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric setting: an interval, plus special values outside it.

    Declared on the schema field (``field(default=..., metadata=at_least(1))``) and read by
    ``validate``; None (an Optional setting left unset) is always accepted.
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple = ()  # special values accepted outside the interval (rm.max_steps=-1)
    hint: str = ""  # what the special values mean, shown in the message

    def accepts(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value):  # NaN compares False with everything: refuse it explicitly
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return not (self.hi is not None and (value > self.hi or (self.hi_open and value == self.hi)))

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else repr(x)

        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {num(self.lo)}"
        elif self.hi is not None:
            text = f"{'<' if self.hi_open else '<='} {num(self.hi)}"
        else:
            text = "a finite number"
        text += "".join(f" or {num(v)}" for v in self.also)
        return text + (f" ({self.hint})" if self.hint else "")


def in_range(
    lo: float | None, hi: float | None, lo_open: bool = False, hi_open: bool = False, also: tuple = (), hint: str = ""
) -> dict[str, Range]:
    """Field metadata: ``lo <= value <= hi`` (either end open or None for unbounded)."""
    return {"range": Range(lo, hi, lo_open, hi_open, tuple(also), hint)}


def at_least(n: float, also: tuple = (), hint: str = "") -> dict[str, Range]:
    return in_range(n, None, also=also, hint=hint)


def positive(hint: str = "") -> dict[str, Range]:
    return in_range(0, None, lo_open=True, hint=hint)


def non_negative(hint: str = "") -> dict[str, Range]:
    return in_range(0, None, hint=hint)


@dataclass
class TinyModelConfig:
    """Shape of the random-init Llama built for tests (``model=tiny``)."""

    hidden_size: int = field(default=64, metadata=at_least(1))
    intermediate_size: int = field(default=128, metadata=at_least(1))
    num_hidden_layers: int = field(default=2, metadata=at_least(1))
    num_attention_heads: int = field(default=4, metadata=at_least(1))
    num_key_value_heads: int = field(default=2, metadata=at_least(1))
    max_position_embeddings: int = field(default=1024, metadata=at_least(2))


# ----------------------------------------------------------------------------- artifact keys


def not_in_key(meta: dict | None = None) -> dict:
    """Field metadata: the setting changes how a stage is observed (logs, checkpoints, samples,
    reports, where caches live), not what the stage builds, so ``artifacts.stage_key`` leaves it
    out of the stage's section. The settings that name an input's model (``PIPELINE``) are
    declared so too: the key holds their path in its ``upstream`` part instead.

    Every other field is in its stage's key: a new setting is keyed unless declared otherwise, so
    forgetting this marks a setting too often rebuilt, never a stale artifact reused.
    """
    return {**(meta or {}), "key": False}


def in_key(f: Any) -> bool:
    """Whether dataclass field ``f`` is part of its stage's artifact key."""
    return f.metadata.get("key", True)


@functools.lru_cache(maxsize=None)
def unkeyed(schema: type) -> dict[str, Any]:
    """The fields of ``schema`` (a section dataclass) left out of artifact keys, nested ones as
    a dict of their own: ``{"logging_steps": True, "lora": {...}}``."""
    hints = typing.get_type_hints(schema)
    out: dict[str, Any] = {}
    for f in fields(schema):
        if not in_key(f):
            out[f.name] = True
        elif is_dataclass(hints[f.name]):
            nested = unkeyed(hints[f.name])
            if nested:
                out[f.name] = nested
    return out


@dataclass
class ModelConfig:
    """Which pretrained model to start from and how to resolve it offline.

    Resolution order for ``name_or_path`` (see ``stackllama.models.resolve``): an existing
    local folder; our conversion cache / the HF cache; the hub, only when reachable;
    the GGUF file shipped in ``gguf_package`` (only when ``name_or_path`` is ``gguf_source``,
    the model that file is a copy of); otherwise an error naming each place looked in.
    """

    name: str = MISSING  # short label used in run names and artifact keys
    name_or_path: str = MISSING  # hub id, local folder, or "tiny"
    tokenizer: Optional[str] = None  # defaults to name_or_path (tiny: the SmolLM2 tokenizer)
    gguf_package: Optional[str] = None  # Python package shipping a GGUF copy
    gguf_file: Optional[str] = None
    gguf_source: Optional[str] = field(
        default=None, metadata=not_in_key()
    )  # the hub id that GGUF is a copy of: used for that name only
    cache_dir: str = field(
        default="${oc.env:STACKLLAMA_CACHE,${oc.env:HOME}/.cache/stackllama}/models", metadata=not_in_key()
    )
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights of the unquantized parts
    # seconds to wait for the hub before treating it as offline
    hub_timeout: float = field(default=3.0, metadata=not_in_key(positive()))
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class QuantizationConfig:
    """bitsandbytes base-weight quantization (runs on CPU with bitsandbytes >= 0.50)."""

    mode: str = "none"  # none | int8 | nf4
    compute_dtype: str = "float32"  # dtype matmuls run in (nf4) / dequantize to when merging
    double_quant: bool = True  # nf4 only: quantize the quantization constants too
    skip_modules: list[str] = field(default_factory=lambda: ["lm_head", "score"])


@dataclass
class LoraConfig:
    """peft LoRA adapters; ``enabled: false`` trains all weights (or none, when quantized)."""

    enabled: bool = False
    r: int = field(default=16, metadata=at_least(1))
    alpha: int = field(default=32, metadata=positive())
    dropout: float = field(default=0.05, metadata=in_range(0, 1, hi_open=True))
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    task_type: str = "CAUSAL_LM"  # CAUSAL_LM for policies, SEQ_CLS for reward models
    # Adapters on the last N decoder layers only (peft's layers_to_transform); None: every layer.
    # Nothing below the lowest adapted layer needs a gradient, so backward stops there: a
    # SmolLM2 (30 layers) train step with adapters on the top 6 runs ~1.9x faster than on all 30.
    top_layers: Optional[int] = field(default=None, metadata=at_least(1))


@dataclass
class SplitsConfig:
    """Fractions of questions per split; no question lands in two splits."""

    finetune: float = field(default=0.3, metadata=in_range(0, 1))
    reward: float = field(default=0.3, metadata=in_range(0, 1))
    rl: float = field(default=0.3, metadata=in_range(0, 1))
    evaluation: float = field(default=0.1, metadata=in_range(0, 1))


@dataclass
class SyntheticDataConfig:
    """Offline Stack-Exchange-like corpus whose votes come from a hidden gold scorer."""

    num_questions: int = field(default=1200, metadata=at_least(1))
    min_answers: int = field(default=2, metadata=at_least(1))
    max_answers: int = field(default=5, metadata=at_least(1))
    # std of Gaussian noise added to the gold quality before voting
    vote_noise: float = field(default=0.5, metadata=non_negative())


@dataclass
class DataConfig:
    """Where questions and answers come from and how they become the four splits."""

    source: str = "synthetic"  # synthetic | stackexchange_dump | h4_preferences | paired
    path: Optional[str] = None  # local file/folder; None means the hub id (if any)
    hub_id: Optional[str] = None
    hub_split: str = "train"
    max_questions: Optional[int] = field(default=None, metadata=at_least(1))  # cap after filtering, for quick runs
    min_answers: int = field(default=2, metadata=at_least(1))
    max_pairs_per_question: int = field(default=10, metadata=at_least(1))
    prompt_template: str = "Question: {question}\n\nAnswer: {answer}"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    seed: int = field(default="${seed}", metadata=in_range(0, 2**32 - 1))  # type: ignore[assignment]


@dataclass
class StageConfig:
    """Which runner ``stackllama.train`` dispatches to."""

    name: str = "sft"  # one of STAGES


@dataclass
class SFTConfig:
    """Supervised fine-tuning (TRL SFTTrainer). Defaults are the article's."""

    learning_rate: float = field(default=1e-4, metadata=positive())
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = field(default=100, metadata=non_negative())
    weight_decay: float = field(default=0.05, metadata=non_negative())
    seq_length: int = field(default=1024, metadata=at_least(2))
    batch_size: int = field(default=4, metadata=at_least(1))
    gradient_accumulation_steps: int = field(default=1, metadata=at_least(1))
    max_steps: int = field(default=10000, metadata=at_least(1))
    packing: bool = True
    # Held out for perplexity: whole finetune questions in a seeded order, until eval_fraction of the
    # questions or eval_size texts (the cap) is reached, always leaving one question to train on.
    eval_fraction: float = field(default=0.1, metadata=in_range(0, 1, hi_open=True))
    eval_size: int = field(default=200, metadata=non_negative())  # cap on held-out texts (0: hold out none)
    eval_batch_size: int = field(default=4, metadata=not_in_key(at_least(1)))
    logging_steps: int = field(default=10, metadata=not_in_key(at_least(1)))
    save_steps: int = field(default=500, metadata=not_in_key(at_least(1)))
    save_total_limit: int = field(default=2, metadata=not_in_key(non_negative(hint="0: keep every checkpoint")))
    gradient_checkpointing: bool = False
    num_sample_generations: int = field(default=4, metadata=not_in_key(non_negative()))
    sample_max_new_tokens: int = field(default=64, metadata=not_in_key(at_least(1)))
    resume: bool = field(
        default=True, metadata=not_in_key()
    )  # continue from the last checkpoint in output_dir when present
    max_train_texts: Optional[int] = field(default=None, metadata=at_least(1))  # cap on training texts (quick runs)


@dataclass
class RMConfig:
    """Reward modelling (TRL RewardTrainer on vote-ranked pairs)."""

    model_path: Optional[str] = field(default=None, metadata=not_in_key())  # None: the SFT artifact
    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(enabled=True, r=8, alpha=32, dropout=0.1, task_type="SEQ_CLS")
    )  # filled from the lora group too: `lora@rm.lora=none` trains the full model
    # Keep only the first N decoder layers of the base (None: all). Scoring is most of the reward
    # model's cost in every stage (training, PPO, eval), and a ranking of answers by their
    # facts, topic and length needs less depth than writing them: SmolLM2's first 16 of 30
    # layers halve that cost (measured in docs/embedded_tuning.md).
    num_layers: Optional[int] = field(default=None, metadata=at_least(1))
    learning_rate: float = field(default=2e-5, metadata=positive())
    batch_size: int = field(default=4, metadata=at_least(1))
    eval_batch_size: int = field(default=8, metadata=not_in_key(at_least(1)))
    gradient_accumulation_steps: int = field(default=1, metadata=at_least(1))
    num_train_epochs: float = field(default=1.0, metadata=positive())
    max_steps: int = field(default=-1, metadata=at_least(1, also=(-1,), hint="-1: train rm.num_train_epochs epochs"))
    max_length: int = field(default=512, metadata=at_least(2))
    weight_decay: float = field(default=0.001, metadata=non_negative())
    lr_scheduler_type: str = "linear"
    warmup_steps: int = field(default=0, metadata=non_negative())
    logging_steps: int = field(default=10, metadata=not_in_key(at_least(1)))
    # a cap; with group_by_question whole questions are kept
    max_train_pairs: Optional[int] = field(default=None, metadata=at_least(1))
    # Train only on pairs whose pm_scores differ by at least this much (1: every pair). Votes are
    # noisy: on the synthetic corpus the gold scorer agrees with 82% of margin-1 pairs and 95% of
    # margin-2 ones. The held-out pairs (eval/accuracy) are never filtered.
    min_pm_margin: int = field(default=1, metadata=at_least(1))
    max_eval_pairs: Optional[int] = field(default=None, metadata=not_in_key(at_least(1)))
    # Also score the held-out pairs before training (eval/accuracy_before: what training bought);
    # one more pass over them
    eval_before: bool = field(default=True, metadata=not_in_key())
    gradient_checkpointing: bool = False
    # Pairs of one question share a batch and each distinct text is forwarded once: the same
    # loss as TRL's RewardTrainer on the same pairs, ~2.5x fewer forwards on a question with
    # 3-5 ranked answers (stackllama/reward/batches.py). false: TRL's pair-by-pair batches.
    group_by_question: bool = True
    # Grouped batches only: distinct texts per forward pass, length-sorted, each chunk padded
    # to its own longest text (a question's answers differ in length). None: one forward a
    # batch (best on a GPU); 4 on CPU cuts the padded tokens from 37% to ~15% (batches of 8 pairs).
    forward_chunk_size: Optional[int] = field(default=None, metadata=at_least(1))


@dataclass
class PPOConfig:
    """Our KL-penalized PPO (see stackllama/ppo). Defaults follow the article's run."""

    policy_path: Optional[str] = field(default=None, metadata=not_in_key())  # None: the SFT artifact
    reward_model_path: Optional[str] = field(default=None, metadata=not_in_key())  # None: the RM artifact
    # Sizes, named as lm-human-preference-details names them (TRL's own names changed meaning
    # between versions: its old PPOConfig.steps counted episodes, its mini_batch_size forward passes).
    # Episodes in the whole run: it runs ceil(total_episodes / batch_size) PPO steps, each sampling
    # batch_size episodes and training on them. The article's PPOConfig(steps=20000) is 20000
    # episodes, 625 steps of 32 (`experiment=article`).
    total_episodes: int = field(default=20000, metadata=at_least(1))
    batch_size: int = field(default=32, metadata=at_least(1))  # episodes per PPO step (article: 32 per process)
    # Episodes per optimizer step (ppo_epochs x batch_size / mini_batch_size optimizer steps a PPO step).
    mini_batch_size: int = field(default=4, metadata=at_least(1))
    # Episodes per forward/backward pass: each optimizer step accumulates the gradient of
    # mini_batch_size / micro_batch_size passes (memory, not the update, changes). None: mini_batch_size.
    micro_batch_size: Optional[int] = field(default=None, metadata=at_least(1))
    ppo_epochs: int = field(default=4, metadata=at_least(1))
    learning_rate: float = field(default=1.4e-5, metadata=positive())
    # adamw: torch's fused AdamW, fp32 moments (TRL's). adamw_8bit: bitsandbytes' AdamW8bit, the two
    # moments block-quantized to 8 bits (2 bytes a parameter instead of 8): for full fine-tuning,
    # where the moments are the largest allocation; the update's numerics differ slightly. On CPU
    # it saved ~350 MB of SmolLM2's 4.1 GB at half the speed (bench/README.md): meant for GPUs.
    optimizer: str = "adamw"
    max_grad_norm: float = field(default=1.0, metadata=positive())
    # Rollout
    max_prompt_length: int = field(default=256, metadata=at_least(1))  # longer prompts are skipped and counted
    min_new_tokens: int = field(default=32, metadata=at_least(1))  # length sampler lower bound (inclusive)
    max_new_tokens: int = field(default=128, metadata=at_least(2))  # length sampler upper bound (exclusive)
    # false (the article): each response runs to its sampled length, sampling past EOS from the
    # unmodified distribution (EOS is never masked out). true: a response ends at its first EOS.
    stop_at_eos: bool = False
    # stop_at_eos only: subtracted from the score of a response that reached its length without
    # an EOS (TRL's missing_eos_penalty; in the units of the normalized score). None: no penalty.
    missing_eos_penalty: Optional[float] = field(default=None, metadata=non_negative())
    # 0 = off. Sampling and the PPO log-probs then differ: keep 0 for on-policy PPO
    top_k: int = field(default=0, metadata=non_negative(hint="0: no top-k filtering"))
    top_p: float = field(default=1.0, metadata=in_range(0, 1, lo_open=True))  # 1.0 = off (same caveat)
    # Sampling temperature; the training forward divides the logits by the same value, so the
    # log-probs PPO and the KL use are those of the distribution that produced the tokens.
    temperature: float = field(default=1.0, metadata=positive())
    # Reward
    reward_baseline: float = 0.0  # subtracted from every raw score
    # Score scale: none (raw RM scores) | sft (minus the mean, over the std, of the scores of the
    # first step's rollouts, which the untrained policy = the SFT model produced; fixed after that
    # step) | running (running mean/std over all scores so far). Makes kl_coef and the value
    # head's targets independent of the reward model's offset and scale.
    score_normalize: str = "none"
    score_clip: Optional[float] = field(default=None, metadata=positive())  # clip the (normalized) score to [-c, c]
    reward_batch_size: int = field(default=16, metadata=at_least(1))
    # KL
    # beta, the KL penalty per nat: the one way to fix it. None: the article's adaptive controller
    # (Ziegler et al. 2019), starting at init_kl_coef and steering the KL toward target over horizon
    kl_coef: Optional[float] = field(default=None, metadata=non_negative())
    init_kl_coef: float = field(default=0.2, metadata=non_negative())
    target: float = field(default=6.0, metadata=positive())
    horizon: float = field(default=10000.0, metadata=positive())
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    # Where the KL penalty goes. false: in the reward, r_t = -beta * KL_t (+ score), as the article
    # and PPO-RLHF. true: GRPO's form (Shao et al. 2024): rewards are the score alone and the loss
    # adds beta * mean_t KL_t between the current policy and the reference (use kl_estimator=k3, as GRPO).
    kl_in_loss: bool = False
    # Advantage estimator (stackllama/ppo/core.py: compute_advantages). gae: the value head's GAE
    # (PPO). rloo: each response's total reward minus the mean of the other samples_per_prompt - 1
    # responses to its prompt (Ahmadian et al. 2024). grpo: the total reward standardized within the
    # prompt's group (Shao et al. 2024). The group estimators train no value head (vf_coef unused).
    advantage: str = "gae"
    # Responses sampled per prompt in a batch (batch_size / samples_per_prompt prompts a step);
    # rloo and grpo need >= 2.
    samples_per_prompt: int = field(default=1, metadata=at_least(1))
    # PPO objective
    gamma: float = field(default=1.0, metadata=in_range(0, 1))
    lam: float = field(default=0.95, metadata=in_range(0, 1))
    cliprange: float = field(default=0.2, metadata=positive())
    cliprange_value: float = field(default=0.2, metadata=positive())
    # Dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c): where the advantage is negative the
    # per-token loss is capped at -dual_clip * A. None: off; typical 3.0.
    dual_clip: Optional[float] = field(default=None, metadata=in_range(1, None, lo_open=True))
    vf_coef: float = field(default=0.1, metadata=non_negative())
    whiten_advantages: bool = True
    # The first N steps train the value head only (the policy does not move, its gradient does
    # not reach the backbone), so the advantages of the first policy updates come from a
    # critic that has seen the reward scale rather than from a random head.
    critic_warmup_steps: int = field(default=0, metadata=non_negative())
    # skip a micro-batch whose mean PPO ratio exceeds it (or is NaN)
    ratio_threshold: float = field(default=10.0, metadata=in_range(1, None, lo_open=True, hint="the ratio starts at 1"))
    # A micro-batch with a NaN/inf loss or ratio, or an update with a NaN/inf gradient norm, is skipped
    # and counted (ppo/skipped_nonfinite); this many mini-batches in a row without an update because
    # of one end the run with an error (the policy has diverged).
    max_nonfinite_skips: int = field(default=3, metadata=not_in_key(at_least(1)))
    # Stop a step's remaining PPO epochs once an epoch's mean approx KL (to the rollout policy)
    # exceeds 1.5 x target_kl (the OpenAI baselines / cleanRL rule). None: never.
    target_kl: Optional[float] = field(default=None, metadata=positive())
    # PPO's adapters on the last N decoder layers only, overriding lora.top_layers (which SFT uses
    # too): SFT adapts the whole model to the domain, PPO's small correction needs less depth and
    # then runs the layers below once per rollout (cache_frozen_prefix). None: as lora.top_layers.
    lora_top_layers: Optional[int] = field(default=None, metadata=at_least(1))
    # With adapters on the top layers only (lora.top_layers) the layers below them are the same for
    # the policy, the reference and every PPO epoch: run them once per rollout and keep their
    # output (B x tokens x hidden floats). Checked against a full forward at start; off: recompute.
    cache_frozen_prefix: bool = field(default=True, metadata=not_in_key())
    # pi_old's log-probs, entropy and values from the rollout's own forward passes (the last hidden
    # state of each generation step, as TRL's PPO took its log-probs from generate) instead of a
    # second policy forward over [query | response]: one full no-grad pass less per step. Used only
    # where the two agree to float rounding (fp32 weights, no autocast, no quantized base); elsewhere,
    # or false, the policy pass runs.
    logprobs_from_rollout: bool = True
    # Memory, full fine-tuning: keep the frozen reference copy and the reward model out of memory
    # except for their passes (once a step each), on CPU in a safetensors file in the stage's work
    # dir, on CUDA in host memory (OpenRLHF's --ref_reward_offload). The run is bit-for-bit the same;
    # each use costs a read of the weights (stackllama/models/offload.py; SmolLM2 full fine-tuning
    # on 2 CPU cores ran 5-9% slower). With LoRA only the reward model moves (the reference is the
    # policy's own base). Needs quantization.mode=none.
    offload_ref_reward: bool = field(default=False, metadata=not_in_key())
    # Memory: for small models the (episodes x tokens x vocabulary) logits, not the weights, set
    # the peak. The LM head runs on this many episodes at a time (checkpointed in training); a plain
    # (fused) head takes at least 128 tokens a tile whatever this says (see core.logprobs_from_hidden).
    head_chunk_size: int = field(default=1, metadata=at_least(1))
    # CPU + glibc only: hand freed heap memory back to the OS between phases (rollout, no-grad
    # pass, optimisation), which otherwise each keep a freed heap (bench_ppo.py: see bench/README).
    malloc_trim: bool = True
    # CPU + glibc only: allocations above this many MiB are mmapped and returned on free: lowest
    # peak RSS, but each costs fresh page faults (1 MiB: 1.8x slower PPO on the tiny model).
    malloc_mmap_threshold_mb: Optional[int] = field(default=None, metadata=at_least(0))
    # auto | mkl | onednn: the library the policy's, reference's and reward model's fp32 CPU linear
    # layers run on. torch sends fp32 CPU matmuls to MKL, which runs AVX2 code on AMD CPUs that have
    # AVX-512; oneDNN picks its kernels from the CPU (2.2x the GFLOP/s on a Zen 5 EPYC, full
    # fine-tuning PPO 1.3-1.5x faster). auto: onednn on a CPU with AVX-512, mkl elsewhere (equal under
    # AVX2 code paths). fp32 runs only (bf16 autocast runs on oneDNN already); quantized layers stay.
    # Not in the artifact key: the same sums in another order, like the thread count
    # (stackllama/models/onednn_linear.py).
    cpu_matmul: str = field(default="auto", metadata=not_in_key())
    # auto | no | bf16 | fp16 for this stage's rollouts and passes; None: the run-wide mixed_precision
    mixed_precision: Optional[str] = None
    # Curves along training (Gao et al. 2022's proxy and gold score against KL): before the first
    # step, every eval_every steps and after the last, the policy answers the evaluation's fixed
    # held-out questions (eval.num_questions, eval.max_new_tokens tokens, the same sampling seed each
    # time) and heldout.jsonl records their RM score, gold score and KL to the reference. The
    # samples use their own RNG stream: training is unchanged. 0: off.
    eval_every: int = field(default=0, metadata=not_in_key(non_negative(hint="0: off")))
    # Bookkeeping
    log_every: int = field(default=1, metadata=not_in_key(non_negative(hint="0 logs every step, as 1")))
    sample_every: int = field(default=10, metadata=not_in_key(non_negative(hint="0: never")))
    num_samples: int = field(default=4, metadata=not_in_key(non_negative()))
    save_every: int = field(default=50, metadata=not_in_key(non_negative(hint="0: no checkpoints")))
    resume: bool = field(default=True, metadata=not_in_key())


@dataclass
class DPOConfig:
    """Direct preference optimization (Rafailov et al. 2023) with TRL's DPOTrainer: the SFT model
    trained on the reward split's pairs against itself (the reference: the adapters disabled),
    with no reward model and no sampling. Defaults follow TRL's StackLlama-2 DPO script."""

    # The SFT model DPO starts from and measures its KL against. None: the SFT artifact; by default
    # the same model as ppo.policy_path, so the methods compare on one SFT model.
    policy_path: Optional[str] = field(default="${ppo.policy_path}", metadata=not_in_key())
    # beta: the strength of the implicit KL to the reference (the loss is
    # -log sigmoid(beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)]))
    beta: float = field(default=0.1, metadata=positive())
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (TRL's loss_type)
    learning_rate: float = field(default=5e-4, metadata=positive())
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = field(default=100, metadata=non_negative())
    weight_decay: float = field(default=0.05, metadata=non_negative())
    batch_size: int = field(default=4, metadata=at_least(1))  # pairs per forward/backward
    gradient_accumulation_steps: int = field(default=4, metadata=at_least(1))
    max_steps: int = field(default=1000, metadata=at_least(1))
    max_length: int = field(default=1024, metadata=at_least(2))  # prompt + answer tokens; longer pairs dropped, counted
    # Train on pairs whose pm_scores differ by at least this much (as rm.min_pm_margin for the RM)
    min_pm_margin: int = field(default=1, metadata=at_least(1))
    max_train_pairs: Optional[int] = field(default=None, metadata=at_least(1))  # cap (quick runs)
    max_eval_pairs: int = field(default=64, metadata=not_in_key(non_negative()))  # held-out pairs for eval/...
    gradient_checkpointing: bool = False
    logging_steps: int = field(default=10, metadata=not_in_key(at_least(1)))


@dataclass
class EvalConfig:
    """Compare the policy under test (eval.policy: PPO or DPO) against its SFT reference on held-out questions."""

    # The policy under test: the artifact of this stage (ppo | dpo), built from the same SFT and
    # judged by the same reward model; policy_path names a finished model instead.
    policy: str = "ppo"
    policy_path: Optional[str] = field(default=None, metadata=not_in_key())
    num_questions: int = field(default=64, metadata=at_least(1))
    max_new_tokens: int = field(default=64, metadata=at_least(1))
    batch_size: int = field(default=16, metadata=at_least(1))
    num_samples_in_report: int = field(default=6, metadata=not_in_key(non_negative()))
    # Best-of-n from the SFT model for each n listed (e.g. [1, 2, 4, 8, 16]): the RM's favourite of n
    # samples, its RM and gold score, and KL = log n - (n-1)/n (stackllama/stages/best_of_n.py). []: off.
    best_of_n: list[int] = field(default_factory=list)


@dataclass
class LoggerConfig:
    """Experiment tracking. ``wandb`` goes offline by itself without credentials/network."""

    backend: str = "wandb"  # wandb | tensorboard | none
    project: str = "stackllama"
    entity: Optional[str] = None
    group: Optional[str] = None  # default: the sweep's name in multirun, else none
    tags: list[str] = field(default_factory=list)
    mode: str = "auto"  # auto | online | offline | disabled


@dataclass
class Config:
    """Root config: one node per group plus run-wide settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = field(default=0, metadata=in_range(0, 2**32 - 1))
    run_name: Optional[str] = None
    artifacts_dir: str = "${oc.env:STACKLLAMA_ARTIFACTS,${hydra:runtime.cwd}/artifacts}"
    device: str = "auto"  # auto | cpu | cuda
    # auto | no | bf16 | fp16: matmuls under autocast, weights and optimizer in model.dtype (as
    # in accelerate). auto: bf16 on a bf16-capable GPU or a CPU with AVX512-BF16/AMX (2-3x faster
    # there), no elsewhere (bf16 is emulated on AVX2 CPUs, ~6x slower); stackllama/precision.py
    mixed_precision: str = "auto"
    # metrics.json key the run returns to Hydra (what Optuna maximizes); None: the stage's own
    # (sft: eval/perplexity, rm: eval/accuracy, ppo: ppo/objective, eval/all: eval/win_rate_vs_sft)
    objective: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes, logged as-is


MIXED_PRECISION = ("auto", "no", "bf16", "fp16")  # stackllama/precision.py
CPU_MATMUL = ("auto", "mkl", "onednn")  # stackllama/models/onednn_linear.py

CHOICES = {
    "stage.name": STAGES,
    "quantization.mode": ("none", "int8", "nf4"),
    "data.source": ("synthetic", "stackexchange_dump", "h4_preferences", "paired"),
    "logger.backend": ("wandb", "tensorboard", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "quantization.compute_dtype": ("float32", "bfloat16", "float16"),
    "lora.task_type": ("CAUSAL_LM", "SEQ_CLS"),
    "rm.lora.task_type": ("CAUSAL_LM", "SEQ_CLS"),
    "ppo.kl_estimator": ("k1", "k2", "k3", "abs"),
    "ppo.score_normalize": ("none", "sft", "running"),
    "ppo.advantage": ("gae", "rloo", "grpo"),
    "ppo.optimizer": ("adamw", "adamw_8bit"),
    "ppo.cpu_matmul": CPU_MATMUL,
    "dpo.loss_type": ("sigmoid", "ipo", "hinge"),
    "eval.policy": POLICY_STAGES,
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": MIXED_PRECISION,
}


class ConfigError(ValueError):
    """One or more settings are invalid; the message lists each, with the key and what is valid."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(problems) == 1:
            text = f"invalid setting: {problems[0]}"
        else:
            text = f"{len(problems)} invalid settings:\n  - " + "\n  - ".join(problems)
        super().__init__(text)


def _schema_problems(node: Any, schema: type, prefix: str, bad: set[str]) -> list[str]:
    """Unknown keys, missing values and out-of-range numbers under ``node`` (typed as ``schema``)."""
    from omegaconf import OmegaConf

    problems: list[str] = []
    names = [f.name for f in fields(schema)]
    hints = typing.get_type_hints(schema)
    where = prefix.rstrip(".") or "the root config"
    for key in node.keys():
        if key in names or (not prefix and key == "hydra"):
            continue
        # Hydra's +key= adds a key even to a typed (struct) node: catch it here, by the schema.
        close = difflib.get_close_matches(str(key), names, n=1)
        problems.append(
            f"{prefix}{key} is not a setting of {where} (drop the +override); "
            + (f"did you mean {prefix}{close[0]}?" if close else f"its settings: {', '.join(names)}")
        )
        bad.add(f"{prefix}{key}")
    for f in fields(schema):
        key = prefix + f.name
        if f.name not in node:
            continue
        if OmegaConf.is_missing(node, f.name):
            problems.append(f"{key} is required (it is ???): set {key}=<value>")
            bad.add(key)
            continue
        if is_dataclass(hints[f.name]):
            problems += _schema_problems(node[f.name], hints[f.name], key + ".", bad)
            continue
        valid: Range | None = f.metadata.get("range")
        if valid is None or OmegaConf.is_interpolation(node, f.name):  # ${seed}: its source is checked
            continue
        value = node[f.name]
        if value is not None and not valid.accepts(value):
            problems.append(f"{key}={value!r} is out of range: must be {valid.describe()}")
            bad.add(key)
    return problems


def _cross_field_problems(cfg: Any, bad: set[str]) -> list[str]:
    """Rules between settings; each runs only when its settings passed their own range checks."""
    problems: list[str] = []

    def ok(*keys: str) -> bool:
        return not bad.intersection(keys)

    fracs = cfg.data.splits
    names = ("finetune", "reward", "rl", "evaluation")
    if ok(*(f"data.splits.{n}" for n in names)):
        total = sum(float(fracs[n]) for n in names)
        if abs(total - 1.0) > 1e-6:
            problems.append(
                f"data.splits must sum to 1, got {total:.4g} ({' + '.join(f'{n}={fracs[n]}' for n in names)})"
            )
    ppo = cfg.ppo
    if ok("ppo.min_new_tokens", "ppo.max_new_tokens") and ppo.min_new_tokens >= ppo.max_new_tokens:
        problems.append(
            f"ppo.min_new_tokens={ppo.min_new_tokens} must be < ppo.max_new_tokens={ppo.max_new_tokens} "
            "(response lengths are drawn from [min, max))"
        )
    if ok("ppo.batch_size", "ppo.mini_batch_size") and ppo.batch_size % ppo.mini_batch_size:
        problems.append(
            f"ppo.batch_size={ppo.batch_size} must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}"
        )
    micro = ppo.micro_batch_size
    if ok("ppo.mini_batch_size", "ppo.micro_batch_size") and micro is not None and ppo.mini_batch_size % micro:
        problems.append(
            f"ppo.mini_batch_size={ppo.mini_batch_size} must be a multiple of ppo.micro_batch_size={micro} "
            "(an optimizer step accumulates mini_batch_size / micro_batch_size forward/backward passes)"
        )
    if ok("ppo.batch_size", "ppo.samples_per_prompt") and ppo.batch_size % ppo.samples_per_prompt:
        problems.append(
            f"ppo.batch_size={ppo.batch_size} must be a multiple of ppo.samples_per_prompt={ppo.samples_per_prompt} "
            "(a step samples batch_size / samples_per_prompt prompts)"
        )
    if ok("ppo.advantage", "ppo.samples_per_prompt") and ppo.advantage != "gae" and ppo.samples_per_prompt < 2:
        problems.append(
            f"ppo.advantage={ppo.advantage} compares the responses to one prompt: set ppo.samples_per_prompt >= 2"
        )
    if ok("ppo.offload_ref_reward", "quantization.mode") and ppo.offload_ref_reward and cfg.quantization.mode != "none":
        problems.append(
            f"ppo.offload_ref_reward=true moves unquantized weights; quantization.mode={cfg.quantization.mode} "
            "keeps its own quantized state (and is small already): set quantization.mode=none or "
            "ppo.offload_ref_reward=false"
        )
    if ok("ppo.mixed_precision") and ppo.mixed_precision not in (None, *MIXED_PRECISION):
        problems.append(
            f"ppo.mixed_precision={ppo.mixed_precision!r} is not valid; choose one of: "
            f"null (the run-wide mixed_precision), {', '.join(MIXED_PRECISION)}"
        )
    if ok("eval.best_of_n") and any(int(n) < 1 for n in cfg.eval.best_of_n):
        problems.append(f"eval.best_of_n={list(cfg.eval.best_of_n)}: every n must be >= 1")
    syn = cfg.data.synthetic
    if ok("data.synthetic.min_answers", "data.synthetic.max_answers") and syn.min_answers > syn.max_answers:
        problems.append(
            f"data.synthetic.min_answers={syn.min_answers} must be <= data.synthetic.max_answers={syn.max_answers}"
        )
    data = cfg.data
    if data.source == "stackexchange_dump" and not data.path:
        problems.append("data.source=stackexchange_dump needs data.path=<a site folder or its Posts.xml>")
    if data.source in ("h4_preferences", "paired") and not data.path and not data.hub_id:
        problems.append(
            f"data.source={data.source} needs data.path=<a local .jsonl/.json/.parquet copy> "
            "(or data.hub_id= with the hub reachable)"
        )
    tiny = cfg.model.tiny
    if cfg.model.name_or_path == "tiny" and ok(
        "model.tiny.hidden_size", "model.tiny.num_attention_heads", "model.tiny.num_key_value_heads"
    ):
        if tiny.hidden_size % tiny.num_attention_heads:
            problems.append(
                f"model.tiny.hidden_size={tiny.hidden_size} must be a multiple of "
                f"model.tiny.num_attention_heads={tiny.num_attention_heads}"
            )
        elif tiny.num_attention_heads % tiny.num_key_value_heads:
            problems.append(
                f"model.tiny.num_attention_heads={tiny.num_attention_heads} must be a multiple of "
                f"model.tiny.num_key_value_heads={tiny.num_key_value_heads}"
            )
    return problems


def validate(cfg: Any) -> None:
    """Check every setting of a composed config against the schema; raise ``ConfigError`` listing
    each problem (key, value, what is valid). Reads the config only: no model, data or network.

    Order: unknown keys, missing values and ranges (every field, by its ``metadata``), the
    string choices (``CHOICES``), then the cross-field rules, which skip settings that already
    failed (so ``ppo.mini_batch_size=0`` is reported as out of range, never divided by).
    """
    from omegaconf import OmegaConf

    bad: set[str] = set()
    problems = _schema_problems(cfg, Config, "", bad)
    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if key not in bad and value not in valid:
            problems.append(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
            bad.add(key)
    problems += _cross_field_problems(cfg, bad)
    if problems:
        raise ConfigError(problems)


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can extend it (``- base_config``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
