"""Merge LoRA adapters into plain base weights (the article merges before the next stage).

A quantized base cannot hold merged weights, so the base is re-loaded unquantized in the
compute dtype and the saved adapter is applied and merged there; the result is a plain HF
folder (weights + tokenizer) any later stage loads without peft or bitsandbytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stackllama.models.loader import torch_dtype, truncation_kwargs


def merge_in_memory(model: Any) -> Any:
    """Fold LoRA into the (unquantized) base weights in place; a model without adapters is returned as is."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def merged_model(
    base_path: str | Path,
    adapter_path: str | Path,
    kind: str,
    dtype: str,
    tokenizer: Any = None,
    num_layers: int | None = None,
    device: Any = None,
) -> Any:
    """``base_path`` reloaded unquantized in ``dtype`` (its first ``num_layers`` decoder layers when
    set) with the adapter in ``adapter_path`` merged in. Merging into bitsandbytes weights would
    requantize (and lose) the LoRA delta, so like the article's merge script the adapter is applied
    to full-precision base weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = truncation_kwargs(base_path, num_layers)
    if kind == "seq_cls":
        base = AutoModelForSequenceClassification.from_pretrained(
            str(base_path), num_labels=1, dtype=torch_dtype(dtype), **extra
        )
        if tokenizer is not None:
            base.config.pad_token_id = tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch_dtype(dtype), **extra)
    if device is not None:
        base.to(device)
    merged = PeftModel.from_pretrained(base, str(adapter_path)).merge_and_unload()
    merged.eval()
    return merged


def merge_adapter_into_base(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    kind: str,
    dtype: str,
    tokenizer: Any,
    num_layers: int | None = None,
) -> Path:
    """``merged_model(...)`` saved with ``tokenizer`` to ``out_dir``."""
    merged = merged_model(base_path, adapter_path, kind, dtype, tokenizer, num_layers)
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)


def merge_trained(
    model: Any, base_path: str | Path, kind: str, quantization: Any, adapter_dir: Path, device: Any
) -> Any:
    """A trained model as a plain one: LoRA folded into full-precision base weights. On a quantized
    base the adapter is saved to ``adapter_dir`` and merged onto ``base_path`` reloaded in
    ``quantization.compute_dtype`` (``merged_model``)."""
    import logging

    if quantization.mode == "none":
        return merge_in_memory(model)
    model.save_pretrained(str(adapter_dir))
    logging.getLogger(__name__).info("Merging the adapter onto the unquantized base (%s)", quantization.compute_dtype)
    return merged_model(base_path, adapter_dir, kind, quantization.compute_dtype, device=device)


def save_plain_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """A plain HF folder (safetensors, no quantization config) plus the tokenizer."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:  # never ship a stale bnb config
        del config.quantization_config
    config.use_cache = True  # the Trainer turns the KV cache off for training; generation wants it
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
