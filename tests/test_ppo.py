"""PPO loop behaviour on a tiny real Llama: masks, reference, KL control, exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stackllama import precision
from stackllama.data.prompts import PromptSource
from stackllama.models.loader import model_folder
from stackllama.ppo import core
from stackllama.ppo.rollout import generate_rollout, response_mask_from
from stackllama.ppo.trainer import PPOTrainer, summarize
from stackllama.stages.ppo import load_policy
from tests.conftest import REPO, compose_cfg, tiny_ppo_cli

CPU = torch.device("cpu")
QUESTIONS = [f"How do I keep batch {i} of my stout from tasting sour?" for i in range(24)]


def _cfg(*overrides: str):
    return compose_cfg(
        [
            "model=tiny",
            "ppo.batch_size=8",
            "ppo.mini_batch_size=4",
            "ppo.min_new_tokens=6",
            "ppo.max_new_tokens=10",
            "ppo.sample_every=0",
            "ppo.save_every=0",
            # the loop's own behaviour, independent of the embedded default's tuning
            "ppo.temperature=1.0",
            "ppo.lam=0.95",
            "ppo.stop_at_eos=false",
            "ppo.score_normalize=none",
            *overrides,
        ]
    )


def _trainer(cfg, tmp_path: Path, seed: int = 0, mixed_precision: str = "no") -> PPOTrainer:
    torch.manual_seed(seed)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)

    def even_token_share(questions, answers):
        """A real (if simple) reward: the share of even token ids in the response."""
        out = []
        for a in answers:
            ids = tok(a, add_special_tokens=False)["input_ids"] or [1]
            out.append(sum(i % 2 == 0 for i in ids) / len(ids))
        return torch.tensor(out)

    prompts = PromptSource(QUESTIONS, [f"Question: {q}\n\nAnswer: " for q in QUESTIONS], tok, 64, seed)
    return PPOTrainer(
        cfg.ppo, policy, tok, even_token_share, prompts, CPU, seed, tmp_path / "ckpt", mixed_precision=mixed_precision
    )


def test_response_mask_cuts_at_length_and_eos():
    ids = torch.tensor([[5, 6, 2, 7, 8], [5, 6, 7, 8, 9]])
    mask = response_mask_from(ids, [5, 3], eos_id=2, stop_at_eos=True)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    mask = response_mask_from(ids, [5, 3], eos_id=2, stop_at_eos=False)
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]


def response_logits(policy, input_ids, attention_mask, query_len: int, reference: bool = False) -> torch.Tensor:
    """(B, R, V) logits of the response positions, through the paths PPO itself uses."""
    if reference:
        hidden, head = policy.reference_hidden(input_ids, attention_mask, query_len)
    else:
        hidden, head, _ = policy(input_ids, attention_mask, query_len)
    return head(hidden)


def test_batched_padded_forward_matches_single_examples():
    """Left-padded queries + right-padded responses give each row's own log-probs."""
    cfg = _cfg()
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    queries = [
        tok(f"Question: {q}\n\nAnswer: ", add_special_tokens=False)["input_ids"] for q in ("short?", QUESTIONS[0])
    ]
    ro = generate_rollout(policy.generation_model(), tok, ["a", "b"], queries, [7, 4], cfg.ppo, CPU)
    with torch.no_grad():
        hidden, head, _ = policy(ro.input_ids, ro.attention_mask, ro.query_len)
        batched, _ = core.logprobs_from_hidden(hidden, head, ro.response_ids, chunk=2)
        for row, q in enumerate(queries):
            n = int(ro.response_mask[row].sum())
            ids = torch.tensor([q + ro.response_ids[row, :n].tolist()])
            single_logits = response_logits(policy, ids, torch.ones_like(ids), len(q))
            single = core.logprobs_from_logits(single_logits, ids[:, len(q) :])
            torch.testing.assert_close(batched[row, :n], single[0], atol=1e-4, rtol=1e-4)
    assert ro.response_mask.sum(1).tolist() == [7, 4]
    # masked positions hold padding, never sampled tokens
    assert (ro.response_ids[1, 4:] == tok.pad_token_id).all()


@pytest.mark.parametrize("top_layers", [None, 1])  # 1: the frozen layers' prefix path too
def test_a_sub_batch_skips_the_left_padding_all_its_rows_share(top_layers):
    """An update's micro-batch keeps the rollout batch's longest query's padding; the policy skips
    the columns that are padding in all of its rows (the backbone sees fewer) with the same states."""
    cfg = _cfg(*([f"ppo.lora_top_layers={top_layers}"] if top_layers else []))
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    texts = ("short?", QUESTIONS[0], "a b")
    queries = [tok(f"Question: {q}\n\nAnswer: ", add_special_tokens=False)["input_ids"] for q in texts]
    ro = generate_rollout(policy.generation_model(), tok, ["a", "b", "c"], queries, [7, 4, 6], cfg.ppo, CPU)
    assert bool(policy.prefix_layers) == bool(top_layers)
    widths = []
    embed = policy._causal_lm().get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, inp, _o: widths.append(inp[0].shape[1]))
    rows = torch.tensor([0, 2])  # the two short queries: the long one's extra columns are padding in both
    with torch.no_grad():
        whole = policy(ro.input_ids, ro.attention_mask, ro.query_len)[0][rows]
        ids, att = ro.input_ids[rows], ro.attention_mask[rows]
        prefix = policy.prefix(ids, att, ro.query_len)
        sub = policy(ids, att, ro.query_len, prefix=prefix)[0]
        ref_whole = policy.reference_hidden(ro.input_ids, ro.attention_mask, ro.query_len)[0][rows]
        ref_sub = policy.reference_hidden(ids, att, ro.query_len, prefix=prefix)[0]
    hook.remove()
    shared = len(queries[1]) - max(len(queries[0]), len(queries[2]))
    assert shared > 0
    full = ro.input_ids.shape[1]
    assert widths[0] == full and widths[1] == full - shared  # the whole batch, then the sub-batch's first pass
    torch.testing.assert_close(sub, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ref_sub, ref_whole, atol=1e-5, rtol=1e-5)
    if top_layers:
        assert prefix.shape[:2] == ids.shape and (prefix[:, :shared] == 0).all()  # skipped columns: zeros


@pytest.mark.parametrize("lora", ["default", "none"])
def test_rollout_hidden_states_give_the_whole_sequence_forward_s_log_probs_and_values(lora):
    """ppo.logprobs_from_rollout: the states generation computed step by step are the ones a forward
    over [query | response] gives (left-padded queries of different lengths, responses cut at
    their lengths and at EOS), so pi_old's log-probs, entropy and values need no second pass."""
    cfg = _cfg(f"lora={lora}", "ppo.stop_at_eos=true")
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # adapters and value head away from their zero init
    queries = [
        tok(f"Question: {q}\n\nAnswer: ", add_special_tokens=False)["input_ids"] for q in ("short?", *QUESTIONS[:3])
    ]
    ro = generate_rollout(
        policy.generation_model(), tok, list("abcd"), queries, [9, 4, 9, 7], cfg.ppo, CPU, keep_hidden=True
    )
    assert ro.hidden.shape == (*ro.response_ids.shape, policy.lm.config.hidden_size)
    with torch.no_grad():
        full, head, values = policy(ro.input_ids, ro.attention_mask, ro.query_len)
        want, want_ent = core.logprobs_from_hidden(full, head, ro.response_ids, with_entropy=True)
        got, got_ent = core.logprobs_from_hidden(ro.hidden, policy.output_head(), ro.response_ids, with_entropy=True)
        got_values = policy.values(ro.hidden)
    m = ro.response_mask.bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_ent[m], want_ent[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_values[m], values[m], atol=1e-5, rtol=1e-5)


def test_logprobs_from_rollout_only_where_exact(tmp_path):
    assert _trainer(_cfg(), tmp_path).logprobs_from_rollout
    assert not _trainer(_cfg("ppo.logprobs_from_rollout=false"), tmp_path).logprobs_from_rollout
    assert not _trainer(_cfg(), tmp_path, mixed_precision="bf16").logprobs_from_rollout  # bf16 rounds differently


def test_reference_is_the_policy_with_adapters_off():
    cfg = _cfg("lora=default")
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    assert policy.reference is None  # no second copy of the weights with LoRA
    ids = torch.tensor([tok("Question: why?\n\nAnswer: because it is", add_special_tokens=False)["input_ids"]])
    att = torch.ones_like(ids)
    with torch.no_grad():
        for p in policy.lm.parameters():
            if p.requires_grad:
                p.add_(0.05)  # move the adapters away from zero: policy != reference now
        pol = response_logits(policy, ids, att, 4)
        ref = response_logits(policy, ids, att, 4, reference=True)
        with policy.lm.disable_adapter():
            base = policy.lm(input_ids=ids).logits[:, 3:-1]
    assert not torch.allclose(pol, ref, atol=1e-3)
    torch.testing.assert_close(ref, base, atol=1e-4, rtol=1e-4)


def exact_kl_to_reference(trainer: PPOTrainer) -> float:
    """Full-vocabulary KL(policy || reference) per token on fixed text (no sampling noise)."""
    tok, policy = trainer.tokenizer, trainer.policy
    enc = tok(
        [f"Question: {q}\n\nAnswer: it depends on the yeast" for q in QUESTIONS[:6]], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        logits = response_logits(policy, enc.input_ids, enc.attention_mask, 1)
        ref = response_logits(policy, enc.input_ids, enc.attention_mask, 1, reference=True)
    lp, lr = logits.log_softmax(-1), ref.log_softmax(-1)
    kl = (lp.exp() * (lp - lr)).sum(-1)  # (B, T-1)
    mask = enc.attention_mask[:, 1:].float()
    return float((kl * mask).sum() / mask.sum())


def test_large_kl_coef_keeps_policy_at_reference(tmp_path):
    """beta = 1e3: every token's KL costs far more than any score, so the policy stays near
    the reference, while the same run with beta = 0 drifts away. Measured with the exact KL
    on fixed text, since 8 sampled episodes give a noisy estimate. The tied run has no value
    loss: its returns are ~-1000 x KL, and fitting them through the shared backbone moves the
    policy by itself (the embedded default's normalized scores and beta 0.1 keep returns ~1)."""
    common = ["lora=default", "ppo.total_episodes=80", "ppo.learning_rate=2e-3"]
    free = _trainer(_cfg(*common, "ppo.kl_coef=0.0"), tmp_path / "free")
    free.train()
    tied = _trainer(_cfg(*common, "ppo.kl_coef=1000.0", "ppo.vf_coef=0.0"), tmp_path / "tied")
    hist = tied.train()
    kl_free, kl_tied = exact_kl_to_reference(free), exact_kl_to_reference(tied)
    assert kl_free > 0.01, kl_free
    assert kl_tied < 0.5 * kl_free, (kl_tied, kl_free)
    assert all(h["objective/kl_coef"] == 1000.0 for h in hist)  # fixed, not adapted


def test_kl_in_the_loss_keeps_the_policy_near_the_reference(tmp_path):
    """ppo.kl_in_loss (GRPO's form): the rewards hold the score alone and the loss carries
    beta * KL(pi || pi_ref) (k3); with a large beta the policy stays near the reference where the
    same run without a penalty drifts."""
    common = ["lora=default", "ppo.total_episodes=80", "ppo.learning_rate=2e-3"]
    free = _trainer(_cfg(*common, "ppo.kl_coef=0.0"), tmp_path / "free")
    free.train()
    tied = _trainer(
        _cfg(*common, "ppo.kl_coef=1000.0", "ppo.kl_in_loss=true", "ppo.kl_estimator=k3", "ppo.vf_coef=0.0"),
        tmp_path / "tied",
    )
    hist = tied.train()
    kl_free, kl_tied = exact_kl_to_reference(free), exact_kl_to_reference(tied)
    assert kl_free > 0.01, kl_free
    assert kl_tied < 0.5 * kl_free, (kl_tied, kl_free)
    assert all(h["ppo/mean_non_score_reward"] == 0.0 for h in hist)  # no KL in the reward
    assert all("ppo/loss/kl" in h for h in hist)


def test_full_fine_tuning_imports_neither_peft_nor_bitsandbytes(tmp_path):
    """Full-fine-tuning PPO (lora=none) loads its policy and a reward model and trains without
    importing peft, or bitsandbytes, which peft imports whenever it is installed (46-52 MB of
    RSS): bench_ppo.py's full-fine-tuning rows leave both out of our side's imports on that basis."""
    script = f"""
import sys
from pathlib import Path
from stackllama.reward import RewardScorer
from tests.conftest import tiny_reward_folder
from tests.test_ppo import CPU, _cfg, _trainer
cfg = _cfg("ppo.total_episodes=8", "lora=none")
RewardScorer.from_pretrained(  # the reward model the stage loads
    str(tiny_reward_folder()), device=CPU, batch_size=4, template=str(cfg.data.prompt_template), mixed_precision="no"
)
_trainer(cfg, Path({str(tmp_path)!r})).train()
print(sorted(m for m in ("peft", "bitsandbytes") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]


def test_adaptive_controller_moves_beta(tmp_path):
    cfg = _cfg(
        "ppo.total_episodes=16",
        "ppo.kl_coef=null",
        "ppo.target=0.001",
        "ppo.horizon=100",
        "ppo.learning_rate=1e-3",
        "lora=none",
    )
    hist = _trainer(cfg, tmp_path).train()
    beta0, beta1 = hist[0]["objective/kl_coef"], hist[1]["objective/kl_coef"]
    kl0 = hist[0]["objective/kl"]
    expected = beta0 * (1 + max(-0.2, min(0.2, kl0 / 0.001 - 1)) * 8 / 100)
    assert beta0 == pytest.approx(0.2)
    assert beta1 == pytest.approx(expected, rel=1e-6)


def test_bf16_autocast_rounds_the_backbone_but_not_the_log_probs(tmp_path):
    """mixed_precision=bf16: the backbone runs in bf16 (results differ from fp32), the LM head
    and log-softmax do not (float32 log-probs within bf16's error of the fp32 ones), and a
    PPO step trains."""
    cfg = _cfg("ppo.total_episodes=8", "ppo.learning_rate=1e-3")
    fp32 = _trainer(cfg, tmp_path / "a")
    bf16 = _trainer(cfg, tmp_path / "b", mixed_precision="bf16")
    idx = list(range(8))
    torch.manual_seed(0)
    with precision.autocast("bf16", CPU):
        ro = generate_rollout(
            bf16.policy.generation_model(),
            bf16.tokenizer,
            [QUESTIONS[i] for i in idx],
            [bf16.prompts.query_ids[i] for i in idx],
            [8] * 8,
            cfg.ppo,
            CPU,
        )
    for trainer in (fp32, bf16):  # the value head starts at zero: give it weights, so values differ too
        torch.manual_seed(1)
        torch.nn.init.normal_(trainer.policy.v_head.weight, std=0.05)
    exact, rounded = fp32._forward_no_grad(ro), bf16._forward_no_grad(ro)
    for a, b in zip(exact, rounded):  # log-probs, values, reference log-probs, entropy
        assert b.dtype == torch.float32
        assert 0 < float((a - b).abs().max()) < 0.05
    before = [p.detach().clone() for p in bf16.policy.trainable_parameters()]
    hist = bf16.train()
    assert all(math.isfinite(v) for v in hist[0].values())
    assert any(not torch.equal(p0, p) for p0, p in zip(before, bf16.policy.trainable_parameters()))


def test_resume_continues_exactly(tmp_path):
    """Checkpoint at step 2, resume in a fresh trainer: steps 3-4 equal an uninterrupted run."""
    cfg4 = _cfg("ppo.total_episodes=32", "ppo.save_every=2", "ppo.learning_rate=1e-3")
    straight = _trainer(cfg4, tmp_path / "a").train()

    cfg2 = _cfg("ppo.total_episodes=16", "ppo.save_every=2", "ppo.learning_rate=1e-3")
    _trainer(cfg2, tmp_path / "b").train()  # stops after the step-2 checkpoint
    resumed = _trainer(cfg4, tmp_path / "b")
    assert resumed.resume() == 2
    hist = resumed.train()
    assert len(hist) == 4
    for key in ("env/reward_mean", "objective/kl", "ppo/loss/policy"):
        assert hist[3][key] == pytest.approx(straight[3][key], rel=1e-4, abs=1e-6), key
    summary = summarize(hist)
    assert summary["ppo/steps"] == 4


@pytest.mark.slow
def test_cli_resume_after_kill(tmp_path):
    """SIGKILL the CLI after its first checkpoint; the same command resumes from it."""
    cmd = tiny_ppo_cli(tmp_path, "ppo.total_episodes=32", "ppo.save_every=2")
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        cmd + [f"hydra.run.dir={tmp_path / 'run1'}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    pointer = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "art" / "ppo").glob("*.work/checkpoints/latest.json"))
        if found:
            pointer = found[0]
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer is not None, "no checkpoint appeared before the deadline"
    assert not list((tmp_path / "art" / "ppo").glob("*/manifest.json")), "a killed run left a trusted artifact"
    step_at_kill = json.loads(pointer.read_text())["step"]
    done = subprocess.run(
        cmd + [f"hydra.run.dir={tmp_path / 'run2'}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["ppo/resumed_from_step"] == step_at_kill
    assert 0 < step_at_kill < 8
    assert metrics["ppo/steps"] == 8
