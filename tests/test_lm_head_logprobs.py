"""The CPU log-prob head against full-logits autograd, and TRL's fused head routed through it."""

import pytest
import torch

from stackllama.models import lm_head_logprobs as heads
from stackllama.models import onednn_linear
from tests.conftest import compose_cfg


def _reference(hidden, weight, bias, targets, temperature, scale):
    z = (hidden @ weight.t() + bias) * scale / temperature  # (N, V)
    logp = z.log_softmax(-1)
    p = logp.exp()
    return (
        logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1),
        -(p * logp).sum(-1),
        torch.logsumexp(2 * logp, -1),
        z.mean(-1),
        z.argmax(-1) == targets,
    )


@pytest.mark.parametrize("entropy_in_loss", [False, True])
def test_log_probs_and_gradients_match_full_logits(monkeypatch, entropy_in_loss):
    monkeypatch.setattr(heads, "TOKEN_CHUNK", 7)  # several chunks, the last one short
    monkeypatch.setattr(heads, "VOCAB_BLOCK", 16)  # several vocabulary blocks, the last one short
    torch.manual_seed(0)
    N, H, V = 19, 8, 50
    leaves = [torch.randn(N, H), torch.randn(V, H), torch.randn(V)]
    targets = torch.randint(0, V, (N,))
    results = []
    for fn in ("ours", "reference"):
        hidden, weight, bias = (x.clone().requires_grad_() for x in leaves)
        if fn == "ours":
            out = heads.LogProbsWithoutLogits.apply(hidden, weight, bias, targets, 0.7, 0, None, 1.3, heads.OUTPUTS)
        else:
            out = _reference(hidden, weight, bias, targets, 0.7, 1.3)
        loss = out[0].sum() + (0.5 * out[1].sum() if entropy_in_loss else 0)
        loss.backward()
        results.append((out, hidden.grad, weight.grad, bias.grad))
    (ours, *our_grads), (ref, *ref_grads) = results
    for a, b in zip(ours[:4], ref[:4]):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[4], ref[4])
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not onednn_linear.onednn_available(), reason="this torch build has no oneDNN")
def test_the_onednn_products_give_the_same_log_probs_and_gradients(monkeypatch):
    """ppo.cpu_matmul=onednn: the head's logits and both gradients as oneDNN products, same figures."""
    monkeypatch.setattr(heads, "TOKEN_CHUNK", 7)
    monkeypatch.setattr(heads, "VOCAB_BLOCK", 16)
    calls = []
    real = onednn_linear.matmul
    monkeypatch.setattr(onednn_linear, "matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    torch.manual_seed(0)
    N, H, V = 19, 8, 50
    leaves = [torch.randn(N, H), torch.randn(V, H)]
    targets = torch.randint(0, V, (N,))
    results = []
    for onednn in (True, False):
        hidden, weight = (x.clone().requires_grad_() for x in leaves)
        logp, _ = heads.logprobs_and_entropy(hidden, weight, None, targets, 0.7, onednn=onednn)
        logp.sum().backward()
        results.append((logp, hidden.grad, weight.grad))
    assert len(calls) == 3 * 4 * 4  # tiles x vocabulary blocks x (logits, recomputed logits, dh, dW)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_trl_fused_head_on_cpu_goes_through_ours_with_the_same_loss(monkeypatch):
    """SFT's loss through TRL's fused head equals the model's own cross-entropy, routed or not."""
    from transformers import AutoModelForCausalLM
    from trl.trainer import utils as trl_utils

    from stackllama.models.loader import model_folder

    original = trl_utils._ChunkedLogProbFunction
    model = AutoModelForCausalLM.from_pretrained(str(model_folder(compose_cfg(["model=tiny"]).model)))
    trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[1, :4] = -100
    own = model(input_ids=ids, labels=labels).loss  # the model's forward: HF's cross-entropy
    fused = model(input_ids=ids, labels=labels, fused_lm_head=True)

    calls = []
    original_apply = heads.LogProbsWithoutLogits.apply
    monkeypatch.setattr(heads.LogProbsWithoutLogits, "apply", lambda *a: calls.append(1) or original_apply(*a))
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", original)  # undone after the test
    assert heads.install_for_trl() and heads.install_for_trl()  # idempotent
    routed = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert calls, "TRL's fused head did not go through ours on CPU"
    torch.testing.assert_close(routed.loss, own, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed.loss, fused.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routed.entropy, fused.entropy, rtol=1e-4, atol=1e-5)
    assert torch.equal(routed.is_top1, fused.is_top1)
