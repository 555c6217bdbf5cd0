"""Every configured model loads with every quantization + LoRA and trains one step on CPU."""

from __future__ import annotations

import pytest
import torch

from stackllama.models.loader import load_model, load_tokenizer, model_folder
from tests.conftest import compose_cfg

MODELS = ["tiny", pytest.param("smollm2-135m", marks=pytest.mark.slow)]
QUANT = ["none", "int8", "nf4"]


def _load(model: str, quant: str, kind: str = "causal_lm", lora: str = "default"):
    cfg = compose_cfg([f"model={model}", f"quantization={quant}", f"lora={lora}"])
    folder = model_folder(cfg.model)
    tok = load_tokenizer(folder)
    lora_cfg = cfg.lora if kind == "causal_lm" else cfg.rm.lora
    return load_model(folder, kind, cfg.quantization, lora_cfg, tokenizer=tok), tok


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("quant", QUANT)
def test_policy_forward_backward(model, quant):
    net, tok = _load(model, quant)
    batch = tok(
        ["Question: why?\n\nAnswer: because", "Question: how?\n\nAnswer: so"], return_tensors="pt", padding=True
    )
    out = net(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert trainable, "LoRA should leave trainable parameters"
    assert all("lora_" in n for n, p in net.named_parameters() if p.requires_grad)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    if quant == "int8":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in net.modules())
    if quant == "nf4":
        import bitsandbytes as bnb

        assert any(isinstance(m, bnb.nn.Linear4bit) for m in net.modules())


@pytest.mark.parametrize("quant", QUANT)
def test_reward_model_forward_backward(quant):
    net, tok = _load("tiny", quant, kind="seq_cls")
    batch = tok(["a good answer", "bad"], return_tensors="pt", padding=True)
    scores = net(**batch).logits
    assert scores.shape == (2, 1)
    scores.sum().backward()
    # the score head is trained (peft modules_to_save), not frozen
    head = [n for n, p in net.named_parameters() if p.requires_grad and "score" in n]
    assert head, "the reward model's score head must be trainable"


def test_quantized_without_lora_refuses_to_train():
    with pytest.raises(ValueError, match="needs LoRA"):
        _load("tiny", "int8", lora="none")


@pytest.mark.parametrize("quant", QUANT)
def test_parameter_counts_are_peft_s_for_every_quantization(quant):
    """One count for SFT, RM and PPO: a 4-bit packed weight at its real size, as peft counts it."""
    from stackllama.models.loader import count_parameters

    net, _ = _load("tiny", quant)
    trainable, total = net.get_nb_trainable_parameters()
    assert count_parameters(net) == {"params/total": total, "params/trainable": trainable}
    plain, _ = _load("tiny", "none")
    assert count_parameters(net)["params/total"] == count_parameters(plain)["params/total"]
