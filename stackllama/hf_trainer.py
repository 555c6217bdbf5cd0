"""Arguments every HF/TRL Trainer of ours gets (SFT, RM, DPO) beyond its own stage's settings."""

from __future__ import annotations

from typing import Any


def checkpointing_kwargs(enabled: bool) -> dict[str, Any]:
    """Training arguments that turn activation checkpointing on or off, explicitly either way.

    TRL's configs default ``gradient_checkpointing`` to True (transformers' to False), so
    leaving the flag out when it is off still checkpoints: every layer's forward runs twice.
    transformers 5.24 renamed it ``activation_checkpointing`` and warns on the old name,
    even when it is False; older releases know only the old one.
    """
    from transformers import TrainingArguments

    name = (
        "activation_checkpointing"
        if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
        else "gradient_checkpointing"
    )
    if not enabled:
        return {name: False}
    return {name: True, f"{name}_kwargs": {"use_reentrant": False}}
