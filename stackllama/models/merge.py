"""Merge LoRA adapters into plain base weights (the article merges before the next stage).

A quantized base cannot hold merged weights, so the base is re-loaded unquantized in the
compute dtype and the saved adapter is applied and merged there; the result is a plain HF
folder (weights + tokenizer) any later stage loads without peft or bitsandbytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stackllama.models.loader import torch_dtype, truncation_kwargs


def merge_adapter_into_base(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    kind: str,
    dtype: str,
    tokenizer: Any,
    num_layers: int | None = None,
) -> Path:
    """``base_path`` unquantized in ``dtype`` (its first ``num_layers`` decoder layers when set) with the
    adapter in ``adapter_path`` merged in, saved with ``tokenizer`` to ``out_dir``."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = truncation_kwargs(base_path, num_layers)
    if kind == "seq_cls":
        base = AutoModelForSequenceClassification.from_pretrained(
            str(base_path), num_labels=1, dtype=torch_dtype(dtype), **extra
        )
        base.config.pad_token_id = tokenizer.pad_token_id
    else:
        base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch_dtype(dtype), **extra)
    merged = PeftModel.from_pretrained(base, str(adapter_path)).merge_and_unload()
    merged.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return Path(out_dir)
