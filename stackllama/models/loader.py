"""One loader for policies (causal LM) and reward models (sequence classification).

Both go through ``load_model``: resolve the weights offline, apply bitsandbytes 8-bit or
NF4 quantization, k-bit training preparation, then peft LoRA. The reward model gets
``num_labels=1`` and a pad token in its config (Llama has none by default).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

from stackllama.models.resolve import is_complete, mark_complete, resolve_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KINDS = ("causal_lm", "seq_cls")


def torch_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but no CUDA device is visible; use device=auto or cpu")
    return torch.device(name)


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    """Tokenizer with a pad token (eos when the model has none) and the requested side."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def _tiny_folder(model_cfg: Any) -> Path:
    """Build (once, seeded) and cache a small random Llama with the configured tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok_path = resolve_model_path(
        model_cfg.tokenizer or "HuggingFaceTB/SmolLM2-135M-Instruct",
        model_cfg.cache_dir,
        model_cfg.gguf_package,
        model_cfg.gguf_file,
        model_cfg.hub_timeout,
        getattr(model_cfg, "gguf_source", None),
        need_weights=False,  # only its tokenizer is used
    )
    shape = {k: int(v) for k, v in dict(model_cfg.tiny).items()}
    key = hashlib.sha256(json.dumps([str(tok_path), shape], sort_keys=True).encode()).hexdigest()[:12]
    folder = Path(os.path.expanduser(model_cfg.cache_dir)) / f"tiny-{key}"
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder):
            return folder
        tok = load_tokenizer(tok_path)
        config = LlamaConfig(
            vocab_size=len(tok),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
            **shape,
        )
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        mark_complete(tmp)
        os.replace(tmp, folder)
    return folder


def model_folder(model_cfg: Any) -> Path:
    """Local folder for the configured base model (tiny models are built and cached)."""
    if model_cfg.name_or_path == "tiny":
        return _tiny_folder(model_cfg)
    return resolve_model_path(
        model_cfg.name_or_path,
        model_cfg.cache_dir,
        model_cfg.gguf_package,
        model_cfg.gguf_file,
        model_cfg.hub_timeout,
        getattr(model_cfg, "gguf_source", None),
    )


def bnb_config(quant_cfg: Any):
    """BitsAndBytesConfig for ``quantization.mode`` (None when unquantized)."""
    from transformers import BitsAndBytesConfig

    skip = list(quant_cfg.skip_modules)
    if quant_cfg.mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if quant_cfg.mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=bool(quant_cfg.double_quant),
            bnb_4bit_compute_dtype=torch_dtype(quant_cfg.compute_dtype),
            llm_int8_skip_modules=skip,
        )
    if quant_cfg.mode == "none":
        return None
    raise ValueError(f"quantization.mode={quant_cfg.mode!r}; choose one of none, int8, nf4")


def adapted_layers(lora_cfg: Any, num_layers: int) -> list[int] | None:
    """Indices of the decoder layers that get adapters (``lora.top_layers``); None = all.

    A value of at least the model's layer count means every layer (so one setting serves a
    30-layer model and the 2-layer test model alike).
    """
    top = lora_cfg.get("top_layers") if hasattr(lora_cfg, "get") else getattr(lora_cfg, "top_layers", None)
    if top is None or int(top) >= num_layers:
        return None
    if int(top) < 1:
        raise ValueError(f"lora.top_layers={top}: choose at least 1, or null for every layer")
    return list(range(num_layers - int(top), num_layers))


def peft_config(lora_cfg: Any, kind: str, num_layers: int | None = None):
    from peft import LoraConfig, TaskType

    task = TaskType.SEQ_CLS if kind == "seq_cls" else TaskType.CAUSAL_LM
    layers = adapted_layers(lora_cfg, num_layers) if num_layers is not None else None
    return LoraConfig(
        r=int(lora_cfg.r),
        lora_alpha=int(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=list(lora_cfg.target_modules),
        bias=str(lora_cfg.bias),
        task_type=task,
        layers_to_transform=layers,
    )


def truncation_kwargs(path: str | Path, num_layers: int | None) -> dict[str, Any]:
    """``from_pretrained`` kwargs that keep the first ``num_layers`` decoder layers of ``path``;
    none when that is every layer (one setting fits SmolLM2's 30 and the tiny model's 2)."""
    if num_layers is None:
        return {}
    from transformers import AutoConfig

    total = getattr(text_config(AutoConfig.from_pretrained(str(path))), "num_hidden_layers", None)
    if total is not None and int(num_layers) >= int(total):
        return {}
    return {"num_hidden_layers": int(num_layers)}


def load_causal_lm(cfg: Any, path: str | Path, device: Any, tokenizer: Any, gradient_checkpointing: bool = False):
    """``path`` as the policy a Trainer fine-tunes (SFT, DPO): a causal LM in ``model.dtype`` with
    the run's ``quantization`` and ``lora`` adapters."""
    return load_model(
        path,
        "causal_lm",
        cfg.quantization,
        cfg.lora,
        dtype=cfg.model.dtype,
        device=device,
        tokenizer=tokenizer,
        gradient_checkpointing=gradient_checkpointing,
    )


def load_model(
    path: str | Path,
    kind: str,
    quant_cfg: Any,
    lora_cfg: Any | None,
    dtype: str = "float32",
    device: torch.device | str = "cpu",
    tokenizer: Any = None,
    trainable: bool = True,
    gradient_checkpointing: bool = False,
    num_layers: int | None = None,
):
    """Load ``path`` as a causal LM or a 1-label classifier, quantized and/or with LoRA.

    ``trainable=False`` skips k-bit preparation and LoRA (frozen scorers, references).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; choose one of {KINDS}")
    device = torch.device(device)
    quant = bnb_config(quant_cfg)
    lora_on = bool(lora_cfg is not None and lora_cfg.enabled)
    if trainable and quant is not None and not lora_on:
        raise ValueError(
            f"quantization={quant_cfg.mode} freezes the base weights: training needs LoRA adapters "
            "(set lora=default, or quantization=none to train all weights)"
        )
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    kwargs.update(truncation_kwargs(path, num_layers))
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = {"": device.index if device.type == "cuda" and device.index else device.type}
    if kind == "seq_cls":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
        pad_id = tokenizer.pad_token_id if tokenizer is not None else model.config.eos_token_id
        model.config.pad_token_id = pad_id
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if quant is None:
        model.to(device)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not trainable:
        model.eval()
        model.requires_grad_(False)
        return model
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        keep_4bit_layers_trainable(model)  # every trainer here evaluates or generates before training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    if lora_on:
        from peft import get_peft_model

        num_layers = text_config(model.config).num_hidden_layers
        model = get_peft_model(model, peft_config(lora_cfg, kind, num_layers))
    return model


def text_config(config: Any) -> Any:
    """The language model's part of a ``transformers`` config (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def keep_4bit_layers_trainable(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel; returns layers touched.

    On CPUs with AVX512-BF16, bitsandbytes >= 0.49 converts a ``Linear4bit``'s weights, in
    place and for good, the first time the layer runs in eval mode without grad, and then
    always multiplies with ``gemv_4bit``, which has no backward. A training run after any
    such forward (ours measures the held-out perplexity first) gets no gradient upstream of
    the last 4-bit layer: the loss stays flat and the adapters stay zero, without an error.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        return 0
    layers = [m for m in model.modules() if isinstance(m, Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def is_quantized(model: torch.nn.Module) -> bool:
    """bitsandbytes weights (8-bit or 4-bit) anywhere in ``model``."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return True
    return any(type(p).__name__ in ("Int8Params", "Params4bit") for p in model.parameters())


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """``params/trainable`` and ``params/total`` for every stage alike, a 4-bit packed weight counted
    at its real size (peft's ``get_nb_trainable_parameters`` rule: stored elements x 2 x bytes per
    stored element), so SFT, RM and PPO report the same total for the same base."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        total += n
        trainable += n if p.requires_grad else 0
    return {"params/total": int(total), "params/trainable": int(trainable)}
