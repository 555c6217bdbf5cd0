"""Structured configs: the typed schema every YAML file in ``conf/`` is merged into.

Hydra validates each composed config against these dataclasses, so an unknown key
(``sft.learnign_rate=1``) or a wrong type (``ppo.batch_size=big``) fails before any
model loads, naming the key. Defaults follow the StackLlama article unless noted; the
embedded CPU default shrinks them through ``conf/experiment/embedded.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

STAGES = ("sft", "rm", "ppo", "eval", "all")


@dataclass
class TinyModelConfig:
    """Shape of the random-init Llama built for tests (``model=tiny``)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024


@dataclass
class ModelConfig:
    """Which pretrained model to start from and how to resolve it offline.

    Resolution order for ``name_or_path`` (see ``stackllama.models.resolve``): an existing
    local folder; our conversion cache / the HF cache; the hub, only when reachable;
    the GGUF file shipped in ``gguf_package``; otherwise an error naming each option.
    """

    name: str = MISSING  # short label used in run names and artifact keys
    name_or_path: str = MISSING  # hub id, local folder, or "tiny"
    tokenizer: Optional[str] = None  # defaults to name_or_path (tiny: the SmolLM2 tokenizer)
    gguf_package: Optional[str] = None  # Python package shipping a GGUF copy
    gguf_file: Optional[str] = None
    cache_dir: str = "${oc.env:STACKLLAMA_CACHE,${oc.env:HOME}/.cache/stackllama}/models"
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights of the unquantized parts
    hub_timeout: float = 3.0  # seconds to wait for the hub before treating it as offline
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
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    task_type: str = "CAUSAL_LM"  # CAUSAL_LM for policies, SEQ_CLS for reward models
    # Adapters on the last N decoder layers only (peft's layers_to_transform); None: every layer.
    # Nothing below the lowest adapted layer needs a gradient, so backward stops there: a
    # SmolLM2 (30 layers) train step with adapters on the top 6 runs ~1.9x faster than on all 30.
    top_layers: Optional[int] = None


@dataclass
class SplitsConfig:
    """Fractions of questions per split; no question lands in two splits."""

    finetune: float = 0.3
    reward: float = 0.3
    rl: float = 0.3
    evaluation: float = 0.1


@dataclass
class SyntheticDataConfig:
    """Offline Stack-Exchange-like corpus whose votes come from a hidden gold scorer."""

    num_questions: int = 1200
    min_answers: int = 2
    max_answers: int = 5
    vote_noise: float = 0.5  # std of Gaussian noise added to the gold quality before voting


@dataclass
class DataConfig:
    """Where questions and answers come from and how they become the four splits."""

    source: str = "synthetic"  # synthetic | stackexchange_dump | h4_preferences | paired
    path: Optional[str] = None  # local file/folder; None means the hub id (if any)
    hub_id: Optional[str] = None
    hub_split: str = "train"
    max_questions: Optional[int] = None  # cap after filtering, for quick runs
    min_answers: int = 2
    max_pairs_per_question: int = 10
    prompt_template: str = "Question: {question}\n\nAnswer: {answer}"
    splits: SplitsConfig = field(default_factory=SplitsConfig)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    seed: int = "${seed}"  # type: ignore[assignment]


@dataclass
class StageConfig:
    """Which runner ``stackllama.train`` dispatches to."""

    name: str = "sft"  # one of STAGES


@dataclass
class SFTConfig:
    """Supervised fine-tuning (TRL SFTTrainer). Defaults are the article's."""

    learning_rate: float = 1e-4
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.05
    seq_length: int = 1024
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = 10000
    packing: bool = True
    eval_size: int = 200  # held-out finetune-split texts for perplexity
    eval_batch_size: int = 4
    logging_steps: int = 10
    save_steps: int = 500
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    num_sample_generations: int = 4
    sample_max_new_tokens: int = 64
    resume: bool = True  # continue from the last checkpoint in output_dir when present
    max_train_texts: Optional[int] = None  # cap on training texts (quick runs)


@dataclass
class RMConfig:
    """Reward modelling (TRL RewardTrainer on vote-ranked pairs)."""

    model_path: Optional[str] = None  # None: the SFT artifact for this config
    lora: LoraConfig = field(
        default_factory=lambda: LoraConfig(enabled=True, r=8, alpha=32, dropout=0.1, task_type="SEQ_CLS")
    )  # filled from the lora group too: `lora@rm.lora=none` trains the full model
    learning_rate: float = 2e-5
    batch_size: int = 4
    eval_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1
    max_length: int = 512
    weight_decay: float = 0.001
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    logging_steps: int = 10
    max_train_pairs: Optional[int] = None  # a cap; with group_by_question whole questions are kept
    max_eval_pairs: Optional[int] = None
    # Also score the held-out pairs before training (eval/accuracy_before: what training bought);
    # one more pass over them
    eval_before: bool = True
    gradient_checkpointing: bool = False
    # Pairs of one question share a batch and each distinct text is forwarded once: the same
    # loss as TRL's RewardTrainer on the same pairs, ~2.5x fewer forwards on a question with
    # 3-5 ranked answers (stackllama/stages/rm_batches.py). false: TRL's pair-by-pair batches.
    group_by_question: bool = True
    # Grouped batches only: distinct texts per forward pass, length-sorted, each chunk padded
    # to its own longest text (a question's answers differ in length). None: one forward a
    # batch (best on a GPU); 4 on CPU cuts the padded tokens from 37% to ~15% (batches of 8 pairs).
    forward_chunk_size: Optional[int] = None


@dataclass
class PPOConfig:
    """Our KL-penalized PPO (see stackllama/ppo). Defaults follow the article's run."""

    policy_path: Optional[str] = None  # None: the SFT artifact for this config
    reward_model_path: Optional[str] = None  # None: the RM artifact for this config
    steps: int = 20000  # PPO steps (batches of rollouts)
    batch_size: int = 32  # episodes per step (article: 32 per process)
    mini_batch_size: int = 4  # episodes per forward/backward
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    learning_rate: float = 1.4e-5
    max_grad_norm: float = 1.0
    # Rollout
    max_prompt_length: int = 256  # longer prompts are skipped and counted
    min_new_tokens: int = 32  # length sampler lower bound (inclusive)
    max_new_tokens: int = 128  # length sampler upper bound (exclusive)
    # false (the article): each response runs to its sampled length, sampling past EOS from the
    # unmodified distribution (EOS is never masked out). true: a response ends at its first EOS.
    stop_at_eos: bool = False
    # stop_at_eos only: subtracted from the score of a response that reached its length without
    # an EOS (TRL's missing_eos_penalty; in the units of the normalized score). None: no penalty.
    missing_eos_penalty: Optional[float] = None
    top_k: int = 0  # 0 = off. Sampling and the PPO log-probs then differ: keep 0 for on-policy PPO
    top_p: float = 1.0  # 1.0 = off (same caveat as top_k)
    # Sampling temperature; the training forward divides the logits by the same value, so the
    # log-probs PPO and the KL use are those of the distribution that produced the tokens.
    temperature: float = 1.0
    # Reward
    reward_baseline: float = 0.0  # subtracted from every raw score
    # Score scale: none (raw RM scores) | sft (minus the mean, over the std, of the scores of the
    # first step's rollouts, which the untrained policy = the SFT model produced; fixed after that
    # step) | running (running mean/std over all scores so far). Makes kl_coef and the value
    # head's targets independent of the reward model's offset and scale.
    score_normalize: str = "none"
    score_clip: Optional[float] = None  # clip the (normalized) score to [-c, c]
    reward_batch_size: int = 16
    # KL
    kl_coef: Optional[float] = None  # set it to fix beta; None uses the adaptive controller
    adap_kl_ctrl: bool = True
    init_kl_coef: float = 0.2
    target: float = 6.0
    horizon: float = 10000.0
    kl_estimator: str = "k1"  # k1 | k2 | k3 | abs
    # PPO objective
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    # Dual-clip PPO (Ye et al. 2020; verl's clip_ratio_c): where the advantage is negative the
    # per-token loss is capped at -dual_clip * A. None: off; typical 3.0.
    dual_clip: Optional[float] = None
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    # The first N steps train the value head only (the policy does not move, its gradient does
    # not reach the backbone), so the advantages of the first policy updates come from a
    # critic that has seen the reward scale rather than from a random head.
    critic_warmup_steps: int = 0
    ratio_threshold: float = 10.0
    target_kl: Optional[float] = None  # early-stop PPO epochs when approx KL exceeds it
    # Memory: for small models the (episodes x tokens x vocabulary) logits, not the weights, set
    # the peak. The LM head runs on this many episodes at a time (checkpointed in training).
    head_chunk_size: int = 1
    # CPU + glibc only: hand freed heap memory back to the OS between phases (rollout, no-grad
    # pass, optimisation), which otherwise each keep a freed heap (bench_ppo.py: see bench/README).
    malloc_trim: bool = True
    # CPU + glibc only: allocations above this many MiB are mmapped and returned on free: lowest
    # peak RSS, but each costs fresh page faults (1 MiB: 1.8x slower PPO on the tiny model).
    malloc_mmap_threshold_mb: Optional[int] = None
    # auto | no | bf16 | fp16 for this stage's rollouts and passes; None: the run-wide mixed_precision
    mixed_precision: Optional[str] = None
    # Bookkeeping
    log_every: int = 1
    sample_every: int = 10
    num_samples: int = 4
    save_every: int = 50
    resume: bool = True


@dataclass
class EvalConfig:
    """Compare the PPO policy against its SFT reference on held-out questions."""

    num_questions: int = 64
    max_new_tokens: int = 64
    batch_size: int = 16
    num_samples_in_report: int = 6


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
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
    "device": ("auto", "cpu", "cuda"),
    "mixed_precision": MIXED_PRECISION,
}


def validate_choices(cfg: Any) -> None:
    """Fail early, naming the key and the valid values, for string-enum fields."""
    from omegaconf import OmegaConf

    for key, valid in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in valid:
            raise ValueError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
    fracs = cfg.data.splits
    total = fracs.finetune + fracs.reward + fracs.rl + fracs.evaluation
    if abs(total - 1.0) > 1e-6 or min(fracs.finetune, fracs.reward, fracs.rl, fracs.evaluation) < 0:
        raise ValueError(f"data.splits must be non-negative and sum to 1, got {total:.4f}")
    if cfg.ppo.min_new_tokens >= cfg.ppo.max_new_tokens:
        raise ValueError("ppo.min_new_tokens must be < ppo.max_new_tokens (the range is [min, max))")
    if cfg.ppo.batch_size % cfg.ppo.mini_batch_size:
        raise ValueError("ppo.batch_size must be a multiple of ppo.mini_batch_size")
    if cfg.ppo.mixed_precision not in (None, *MIXED_PRECISION):
        raise ValueError(f"ppo.mixed_precision={cfg.ppo.mixed_precision!r} is not valid; choose one of: "
                         f"null (the run-wide mixed_precision), {', '.join(MIXED_PRECISION)}")
    if cfg.ppo.head_chunk_size < 1:
        raise ValueError(f"ppo.head_chunk_size must be >= 1, got {cfg.ppo.head_chunk_size}")


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can extend it (``- base_config``)."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
