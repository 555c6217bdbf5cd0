"""fp32 CPU linear layers on oneDNN (ppo.cpu_matmul): the same outputs and gradients as F.linear."""

import copy

import pytest
import torch
from torch import nn

from stackllama.config import ConfigError, validate
from stackllama.models import onednn_linear
from stackllama.models.decode_matmul import weight_major_decode
from stackllama.models.onednn_linear import onednn_available, resolve_cpu_matmul, use_onednn_linears
from tests.conftest import compose_cfg

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_forward_and_backward(bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(fast) == 1 and "forward" in vars(fast)
    calls = []
    real = onednn_linear._inner_product
    onednn_linear._inner_product = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        x = torch.randn(3, 7, 48, requires_grad=True)
        x2 = x.detach().clone().requires_grad_()
        y, y2 = plain(x), fast(x2)
        g = torch.randn_like(y)
        y.backward(g)
        y2.backward(g)
    finally:
        onednn_linear._inner_product = real
    assert len(calls) == 3, "forward, dx and dW: each one oneDNN product"
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad, rtol=1e-4, atol=1e-4)
    if bias:
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_deepcopy_binds_the_copy_and_autocast_and_other_dtypes_fall_back():
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    use_onednn_linears(layer)
    twin = copy.deepcopy(layer)  # e.g. a reference copy of the policy
    with torch.no_grad():
        twin.weight.add_(1.0)
    x = torch.randn(4, 16)
    torch.testing.assert_close(twin(x), nn.functional.linear(x, twin.weight, twin.bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(twin(x), layer(x)), "the copy's forward must read the copy's weights"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # bf16 autocast: F.linear, as without the switch
    assert use_onednn_linears(layer) == 0, "a second call sets nothing more"


@needs_onednn
def test_tiny_llama_on_onednn_gives_the_same_loss_gradients_and_generation():
    """A whole model: the same logits, loss gradients and samples; weight-major decode leaves its layers."""
    from transformers import AutoModelForCausalLM

    from stackllama.models.loader import model_folder

    folder = str(model_folder(compose_cfg(["model=tiny"]).model))
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()
    fast = copy.deepcopy(plain)
    assert use_onednn_linears(fast) == sum(type(m) is nn.Linear for m in fast.modules())
    ids = torch.randint(3, plain.config.vocab_size, (2, 9))
    for model in (plain, fast):
        model(ids, labels=ids).loss.backward()
    torch.testing.assert_close(fast(ids).logits, plain(ids).logits, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=name)

    def sample(model):
        torch.manual_seed(0)
        with torch.no_grad(), weight_major_decode(model):
            return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=6)

    assert torch.equal(sample(fast), sample(plain))


def test_auto_resolves_by_the_cpu_and_bad_values_are_refused(monkeypatch):
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: True)
    monkeypatch.setattr(onednn_linear, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert resolve_cpu_matmul("auto") == "onednn"
    assert resolve_cpu_matmul("mkl") == "mkl"
    monkeypatch.setattr(onednn_linear, "cpu_flags", lambda: frozenset({"avx2"}))
    assert resolve_cpu_matmul("auto") == "mkl"  # AVX2 only: MKL, as measured equal there
    assert resolve_cpu_matmul("onednn") == "onednn"
    assert use_onednn_linears(nn.Linear(4, 4), "auto") == 0
    monkeypatch.setattr(onednn_linear, "onednn_available", lambda: False)
    assert resolve_cpu_matmul("onednn") == "mkl"  # no oneDNN in this torch: MKL, never an error
    with pytest.raises(ValueError, match="cpu_matmul='blas'"):
        resolve_cpu_matmul("blas")
    with pytest.raises(ConfigError, match="ppo.cpu_matmul"):
        validate(compose_cfg(["ppo.cpu_matmul=blas"]))


@needs_onednn
@pytest.mark.parametrize("mode", ["onednn", "mkl"])
def test_the_ppo_stage_sets_policy_reference_and_reward_model(mode):
    """stages/ppo.cpu_linears: every linear layer of the three models in fp32 runs, or none with mkl or bf16."""
    from stackllama.models.loader import model_folder
    from stackllama.reward import RewardScorer
    from stackllama.stages.ppo import cpu_linears, load_policy
    from tests.conftest import tiny_reward_folder

    cfg = compose_cfg(["model=tiny", "lora=none", f"ppo.cpu_matmul={mode}"])
    policy, _ = load_policy(cfg, model_folder(cfg.model), torch.device("cpu"))
    reward = RewardScorer.from_pretrained(tiny_reward_folder(), batch_size=2, max_length=32)
    assert cpu_linears(cfg, policy, reward, "bf16", torch.device("cpu")) == "mkl"  # bf16 autocast: on oneDNN already
    assert not [m for m in policy.modules() if "forward" in vars(m)]
    assert cpu_linears(cfg, policy, reward, "no", torch.device("cpu")) == mode
    for model in (policy.lm, policy.reference, reward.model):
        linears = [m for m in model.modules() if type(m) is nn.Linear]
        assert linears and all(("forward" in vars(m)) == (mode == "onednn") for m in linears)
