"""PPO options of the first-run issue, each on a tiny real Llama or hand-computed tensors.

The learning test is the one that matters most: PPO must raise a programmatic reward, and
the same test fails when the policy-gradient sign is flipped (checked by hand: with
``advantages -> -advantages`` in ``core.policy_loss`` the reward falls from ~0.1 to 0).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stackllama import precision
from stackllama.data.prompts import PromptSource
from stackllama.models.loader import model_folder
from stackllama.ppo import core
from stackllama.ppo.rollout import generate_rollout
from stackllama.ppo.trainer import PPOTrainer, summarize, window_stats
from stackllama.stages.ppo import load_policy
from tests.conftest import compose_cfg
from tests.test_ppo import QUESTIONS

CPU = torch.device("cpu")
QUERIES = [f"Question: {q}\n\nAnswer: " for q in QUESTIONS]


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
            "ppo.stop_at_eos=false",
            "ppo.temperature=1.0",
            "ppo.kl_coef=0.0",
            "ppo.lora_top_layers=null",
            *overrides,
        ]
    )


def _policy(cfg, logit_scale: float = 1.0, eos_boost: float = 0.0):
    """The tiny policy; ``logit_scale`` sharpens it (the random tiny model is near-uniform over
    49k tokens, unlike a pretrained LM); ``eos_boost`` makes EOS likely at every position."""
    torch.manual_seed(0)
    policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
    with torch.no_grad():
        emb = policy.lm.get_input_embeddings().weight  # tied with the LM head
        emb.mul_(logit_scale)
        if eos_boost:
            # a row aligned with the mean final hidden state makes EOS the likely next token
            probe = torch.tensor([tok(QUERIES[0], add_special_tokens=False)["input_ids"]])
            h = policy.lm.get_base_model().model(input_ids=probe).last_hidden_state[0].mean(0)
            emb[tok.eos_token_id] = eos_boost * h / h.norm()
    return policy, tok


def _trainer(cfg, policy, tok, scorer, tmp_path: Path) -> PPOTrainer:
    prompts = PromptSource(QUESTIONS, QUERIES, tok, 64, 0)
    return PPOTrainer(cfg.ppo, policy, tok, scorer, prompts, CPU, 0, tmp_path / "ckpt")


# --------------------------------------------------------------------------- learning


@pytest.mark.parametrize(
    "estimator",
    [[], ["ppo.advantage=rloo", "ppo.samples_per_prompt=4"], ["ppo.advantage=grpo", "ppo.samples_per_prompt=4"]],
    ids=["gae", "rloo", "grpo"],
)
def test_ppo_raises_a_programmatic_reward(tmp_path, estimator):
    """One-token answers to 24 prompts, reward 1 for one token (the likeliest first token, p ~ 0.15
    at the start): 30 steps of full fine-tuning lift the reward clearly (to ~0.95), with the value
    head's GAE and with each group baseline (4 samples of each of 2 prompts a step)."""
    cfg = _cfg(
        "lora=none",
        "ppo.total_episodes=240",
        "ppo.learning_rate=1e-3",
        "ppo.min_new_tokens=1",
        "ppo.max_new_tokens=2",
        *estimator,
    )
    policy, tok = _policy(cfg, logit_scale=8.0)
    prompts = PromptSource(QUESTIONS, QUERIES, tok, 64, 0)
    with torch.no_grad():
        first = torch.stack(
            [policy.lm(input_ids=torch.tensor([q])).logits[0, -1].softmax(-1) for q in prompts.query_ids]
        ).mean(0)  # (V,) mean first-token distribution
    target = tok.decode([int(first.argmax())])
    p0 = float(first.max())

    def reward(questions, answers):  # (B,): 1.0 when the answer is the target token
        return torch.tensor([float(a == target) for a in answers])

    history = _trainer(cfg, policy, tok, reward, tmp_path).train()
    rewards = [h["env/reward_mean"] for h in history]
    start, end = float(np.mean(rewards[:5])), float(np.mean(rewards[-5:]))
    assert 0.05 < p0 < 0.5, p0
    assert end > max(2 * start, start + 0.3), (start, end)
    assert end > 0.6, rewards


# --------------------------------------------------------------------------- EOS handling


def test_sampling_past_eos_does_not_mask_eos(tmp_path):
    """stop_at_eos=false keeps sampling past EOS from the unmodified distribution: EOS shows up
    inside responses (the old min_new_tokens masked it out, so sampled tokens came from another
    distribution than the one PPO scores) and every response keeps its sampled length."""
    cfg = _cfg()
    policy, tok = _policy(cfg, eos_boost=40.0)
    ids = [tok(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:8]]
    torch.manual_seed(0)
    ro = generate_rollout(policy.generation_model(), tok, QUESTIONS[:8], ids, [8] * 8, cfg.ppo, CPU)
    assert ro.response_mask.sum(1).tolist() == [8] * 8
    assert int((ro.response_ids == tok.eos_token_id).sum()) > 8  # EOS sampled, and sampled past
    assert not ro.ended.any()


def test_stop_at_eos_ends_responses_and_penalizes_the_ones_without(tmp_path):
    cfg = _cfg("ppo.stop_at_eos=true", "ppo.missing_eos_penalty=2.0", "ppo.score_normalize=none")
    for boost, some_end in ((2.5, True), (0.0, False)):  # EOS likely / EOS ~1 in 49k
        policy, tok = _policy(cfg, eos_boost=boost)
        ids = [tok(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:8]]
        torch.manual_seed(0)
        ro = generate_rollout(policy.generation_model(), tok, QUESTIONS[:8], ids, [8] * 8, cfg.ppo, CPU)
        for row, ended in enumerate(ro.ended.tolist()):
            n = int(ro.response_mask[row].sum())
            assert ended == (int(ro.response_ids[row, n - 1]) == tok.eos_token_id)  # EOS kept, as the last token
            assert (ro.response_ids[row, : n - 1] != tok.eos_token_id).all()  # cut at the first EOS
            assert ended or n == 8  # a response without EOS runs to its sampled length
        assert bool(ro.ended.any()) == some_end, ro.ended

    trainer = _trainer(cfg, policy, tok, None, tmp_path)
    raw = torch.tensor([1.0, 1.0, 3.0])
    shaped = trainer._shape_scores(raw, torch.tensor([True, False, False]))
    assert shaped.tolist() == [1.0, -1.0, 1.0]  # score - 2.0 where no EOS was reached


# --------------------------------------------------------------------------- temperature


def test_logprobs_divide_logits_by_the_temperature():
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 8)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 3))
    lp, ent = core.logprobs_from_hidden(hidden, head, labels, chunk=1, with_entropy=True, temperature=0.5)
    with torch.no_grad():
        ref = torch.log_softmax(head(hidden) / 0.5, -1)
    torch.testing.assert_close(lp, ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    with pytest.raises(ValueError, match="temperature"):
        core.logprobs_from_hidden(hidden, head, labels, temperature=0.0)


def test_trainer_scores_tokens_under_the_sampling_temperature(tmp_path):
    """ppo.temperature=0.5: the no-grad pass gives log softmax(logits / 0.5) of the sampled tokens,
    so the first update starts at ratio 1 against the distribution that sampled them."""
    cfg = _cfg("ppo.temperature=0.5")
    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, None, tmp_path)
    ids = [tok(q, add_special_tokens=False)["input_ids"] for q in QUERIES[:4]]
    ro = generate_rollout(policy.generation_model(), tok, QUESTIONS[:4], ids, [5] * 4, cfg.ppo, CPU)
    logprobs, _, ref_logprobs, _ = trainer._forward_no_grad(ro)
    with torch.no_grad():
        logits = policy.lm(
            input_ids=ro.input_ids,
            attention_mask=ro.attention_mask,
            position_ids=(ro.attention_mask.cumsum(-1) - 1).clamp(min=0),
        ).logits
        expected = (
            torch.log_softmax(logits[:, ro.query_len - 1 : -1] / 0.5, -1)
            .gather(-1, ro.response_ids.unsqueeze(-1))
            .squeeze(-1)
        )
    torch.testing.assert_close(logprobs, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref_logprobs, expected, atol=1e-4, rtol=1e-4)  # adapters start at zero


# --------------------------------------------------------------------------- score scale


def test_score_normalize_sft_uses_the_first_steps_scores_then_stays_fixed(tmp_path):
    cfg = _cfg("ppo.score_normalize=sft")
    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, None, tmp_path)
    no_eos = torch.zeros(4, dtype=torch.bool)
    first = trainer._shape_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), no_eos)
    mu, sd = 2.5, float(torch.tensor([1.0, 2.0, 3.0, 4.0]).std())
    torch.testing.assert_close(first, (torch.tensor([1.0, 2.0, 3.0, 4.0]) - mu) / sd)
    trainer.step_idx = 1  # later steps: the same mu and sigma
    later = trainer._shape_scores(torch.tensor([10.0, 10.0, 10.0, 10.0]), no_eos)
    torch.testing.assert_close(later, torch.full((4,), (10.0 - mu) / sd))

    running = _trainer(_cfg("ppo.score_normalize=running"), policy, tok, None, tmp_path / "r")
    running._shape_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), no_eos)
    running.step_idx = 1
    running._shape_scores(torch.tensor([10.0, 10.0, 10.0, 10.0]), no_eos)
    assert running.score_moments.count == 8 and running.score_moments.mean == pytest.approx(6.25)

    equal = _trainer(_cfg("ppo.score_normalize=sft"), policy, tok, None, tmp_path / "e")
    out = equal._shape_scores(torch.zeros(4), no_eos)  # no spread to scale by: centred only, never / 0
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_score_baseline_and_clip_shape_the_raw_scores(tmp_path):
    """s = clip(r - reward_baseline, -score_clip, score_clip), after any normalization."""
    cfg = _cfg("ppo.score_normalize=none", "ppo.reward_baseline=1.0", "ppo.score_clip=2.0")
    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, None, tmp_path)
    out = trainer._shape_scores(torch.tensor([-5.0, 0.0, 2.5, 9.0]), torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(out, torch.tensor([-2.0, -1.0, 1.5, 2.0]))


# --------------------------------------------------------------------------- critic warm-up


def test_critic_warmup_trains_the_value_head_alone(tmp_path):
    cfg = _cfg("ppo.critic_warmup_steps=1", "ppo.total_episodes=16", "ppo.learning_rate=1e-3")

    def reward(questions, answers):
        return torch.tensor([float(len(a)) for a in answers])

    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, reward, tmp_path)
    adapters = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad and "lora" in n}
    head = policy.v_head.weight.detach().clone()
    stats = trainer.step()
    assert stats["ppo/critic_warmup"] == 1.0 and "ppo/loss/policy" not in stats
    assert all(torch.equal(p, adapters[n]) for n, p in policy.named_parameters() if n in adapters)
    assert not torch.equal(policy.v_head.weight, head)
    stats = trainer.step()  # warm-up over: the policy moves
    assert stats["ppo/critic_warmup"] == 0.0 and "ppo/loss/policy" in stats
    assert any(not torch.equal(p, adapters[n]) for n, p in policy.named_parameters() if n in adapters)


# --------------------------------------------------------------------------- dual clip


def test_dual_clip_caps_the_loss_of_negative_advantages():
    # one token, A = -1, ratio = e^2 ~ 7.39: plain PPO loss -A * ratio = 7.39; dual clip c=3 caps it at 3
    old, lp = torch.zeros(1, 1), torch.full((1, 1), 2.0)
    adv, mask = -torch.ones(1, 1), torch.ones(1, 1)
    plain, _ = core.policy_loss(lp, old, adv, mask, cliprange=0.2)
    capped, stats = core.policy_loss(lp, old, adv, mask, cliprange=0.2, dual_clip=3.0)
    assert plain.item() == pytest.approx(math.exp(2.0))
    assert capped.item() == pytest.approx(3.0)
    assert stats["dual_clipfrac"].item() == 1.0
    # positive advantages are untouched by the dual clip
    pos, _ = core.policy_loss(lp, old, -adv, mask, cliprange=0.2, dual_clip=3.0)
    assert pos.item() == pytest.approx(-1.2)
    with pytest.raises(ValueError, match="dual_clip"):
        core.policy_loss(lp, old, adv, mask, cliprange=0.2, dual_clip=1.0)


# --------------------------------------------------------------------------- LoRA on top layers


def test_lora_top_layers_adapts_only_the_last_layers():
    cfg = _cfg("lora=default", "lora.top_layers=1")
    policy, _ = _policy(cfg)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in policy.named_parameters() if "lora_A" in n}
    assert adapted == {"1"}  # the tiny model has layers 0 and 1
    cfg = _cfg("lora=default", "lora.top_layers=8")  # more than the model has: every layer
    policy, _ = _policy(cfg)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in policy.named_parameters() if "lora_A" in n}
    assert adapted == {"0", "1"}
    cfg = _cfg("lora=default", "ppo.lora_top_layers=1")  # PPO's own override of the SFT adapters' layers
    policy, _ = _policy(cfg)
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in policy.named_parameters() if "lora_A" in n}
    assert adapted == {"1"} and policy.prefix_layers == 1


# --------------------------------------------------------------------------- precision


def test_mixed_precision_auto_follows_the_hardware(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    from stackllama import artifacts
    from stackllama.task import resolve_precision

    for fast, expected in ((True, "bf16"), (False, "no")):
        monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert precision.resolve("auto", CPU) == expected
        assert precision.resolve("no", CPU) == "no" and precision.resolve("bf16", CPU) == "bf16"  # explicit wins
        cfg = compose_cfg(
            ["model=tiny", "mixed_precision=auto", "ppo.mixed_precision=auto", f"artifacts_dir={tmp_path}"]
        )
        key_auto = artifacts.stage_key("sft", cfg)
        resolve_precision(cfg, CPU)
        assert cfg.mixed_precision == expected and cfg.ppo.mixed_precision == expected
        assert key_auto == artifacts.stage_key("sft", cfg)  # keyed by the resolved value
        assert key_auto == artifacts.stage_key("sft", OmegaConf.merge(cfg, {"mixed_precision": expected}))
    assert compose_cfg([]).mixed_precision == "no"  # tests pin it (conftest); the schema's default is auto
    from stackllama.config import Config

    assert Config().mixed_precision == "auto"


# --------------------------------------------------------------------------- summaries


def test_window_stats_pool_every_episode():
    rows = [{"m": 1.0, "s": 0.0, "env/episodes": 2.0}, {"m": 3.0, "s": 0.0, "env/episodes": 2.0}]
    mean, stderr = window_stats(rows, "m", "s")
    episodes = np.array([1.0, 1.0, 3.0, 3.0])
    assert mean == pytest.approx(episodes.mean())
    assert stderr == pytest.approx(episodes.std(ddof=1) / 2.0)
    history = [
        {
            "env/reward_mean": float(i),
            "env/reward_std": 1.0,
            "env/episodes": 8.0,
            "objective/kl": 0.0,
            "objective/kl_coef": 0.1,
            "ppo/skipped_batches": 0.0,
        }
        for i in range(20)
    ]
    out = summarize(history)
    assert out["ppo/reward_mean_start"] == pytest.approx(0.5) and out["ppo/reward_mean_end"] == pytest.approx(18.5)
    assert 0 < out["ppo/reward_mean_start_stderr"] < 1


def test_frozen_prefix_cache_changes_nothing_but_the_work(tmp_path):
    """Adapters on the top layer only: the bottom layer's output is computed once per rollout and
    reused by the reference pass and the PPO epochs; the figures equal a run that recomputes it."""
    runs = {}
    for cache in (True, False):
        cfg = _cfg(
            "lora=default",
            "lora.top_layers=1",
            "ppo.total_episodes=16",
            "ppo.learning_rate=1e-3",
            f"ppo.cache_frozen_prefix={str(cache).lower()}",
        )
        torch.manual_seed(0)
        policy, tok = load_policy(cfg, model_folder(cfg.model), CPU)
        assert policy.prefix_layers == (1 if cache else 0)

        def reward(questions, answers):
            return torch.tensor([float(len(a)) / 10 for a in answers])

        runs[cache] = _trainer(cfg, policy, tok, reward, tmp_path / str(cache)).train()
    for key in ("env/reward_mean", "objective/kl", "ppo/loss/policy", "ppo/loss/value", "ppo/policy/approxkl"):
        assert runs[True][-1][key] == pytest.approx(runs[False][-1][key], rel=1e-4, abs=1e-6), key


def test_the_article_experiment_runs_the_article_s_number_of_episodes():
    # The article's TRL PPOConfig(steps=20000, batch_size=32) meant 20000 episodes, i.e. 625 PPO
    # steps of 32 (our old ppo.steps counted PPO steps and defaulted to 20000, 32x the article).
    from stackllama.ppo.trainer import num_steps

    cfg = compose_cfg(["experiment=article"])
    assert cfg.ppo.total_episodes == 20000 and cfg.ppo.batch_size == 32 and num_steps(cfg.ppo) == 625
    assert num_steps(compose_cfg(["ppo.total_episodes=33", "ppo.batch_size=32"]).ppo) == 2  # rounded up, as TRL


# --------------------------------------------------------------------------- update mechanics


def _length_reward(questions, answers):
    return torch.tensor([float(len(a)) for a in answers])


def _one_step(tmp_path: Path, *overrides: str, steps: int = 1) -> tuple[dict, dict]:
    cfg = _cfg("lora.dropout=0.0", "ppo.min_new_tokens=8", "ppo.max_new_tokens=9", "ppo.learning_rate=1e-2", *overrides)
    policy, tok = _policy(cfg)
    torch.manual_seed(1)
    trainer = _trainer(cfg, policy, tok, _length_reward, tmp_path)
    for _ in range(steps):
        stats = trainer.step()
    return stats, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_gradient_accumulation_splits_a_mini_batch_without_changing_the_update(tmp_path):
    """ppo.mini_batch_size episodes per optimizer step, whatever ppo.micro_batch_size: with
    equal-length responses 2 micro-batches of 2 give the update of one forward over 4."""
    _, once = _one_step(tmp_path / "a", "ppo.micro_batch_size=4")
    _, split = _one_step(tmp_path / "b", "ppo.micro_batch_size=2")
    _, other = _one_step(tmp_path / "c", "ppo.mini_batch_size=2")  # twice the optimizer steps: another update

    def rel(x: dict, y: dict) -> float:  # relative distance over all trained tensors
        return float(sum((x[n] - y[n]).norm() ** 2 for n in x) ** 0.5 / sum(x[n].norm() ** 2 for n in x) ** 0.5)

    # Adam turns float-rounding differences of near-zero gradients into visible ones: compare the
    # whole update (5e-5 here) against what another update looks like (0.4 here).
    assert rel(once, split) < 1e-3 and rel(once, other) > 0.1


def test_ratio_threshold_skips_micro_batches_that_moved_too_far(tmp_path):
    stats, _ = _one_step(tmp_path / "a", "ppo.ppo_epochs=3")
    assert stats["ppo/skipped_batches"] == 0  # the default threshold, 10
    stats, _ = _one_step(tmp_path / "b", "ppo.ppo_epochs=3", "ppo.ratio_threshold=1.000001")
    assert stats["ppo/skipped_batches"] > 0


def test_target_kl_stops_the_remaining_epochs(tmp_path):
    """An epoch's mean approx KL above 1.5 x target_kl ends the step's epochs (ppo/early_stop)."""
    free, _ = _one_step(tmp_path / "a", "ppo.ppo_epochs=4")
    stopped, _ = _one_step(tmp_path / "b", "ppo.ppo_epochs=4", "ppo.target_kl=1e-9")
    assert free["ppo/early_stop"] == 0.0 and stopped["ppo/early_stop"] == 1.0


@pytest.mark.parametrize("estimator", ["k2", "k3", "abs"])
def test_a_non_k1_estimator_drives_the_kl_in_the_reward(tmp_path, estimator):
    """ppo.kl_estimator reaches the KL penalty: a non-negative estimator gives a non-negative KL,
    and a different one from k1's on the same rollouts."""
    k1, _ = _one_step(tmp_path / "k1", "ppo.kl_coef=0.1", steps=2)  # step 1 is at the reference: KL 0
    other, _ = _one_step(tmp_path / estimator, "ppo.kl_coef=0.1", f"ppo.kl_estimator={estimator}", steps=2)
    assert other["objective/kl"] >= 0.0 and other["objective/kl"] != pytest.approx(k1["objective/kl"])


def test_the_ppo_group_picks_the_rl_method():
    """``ppo=gae|rloo|grpo`` sets the estimator and what it needs; the experiment's settings stay."""
    gae, rloo, grpo = (compose_cfg([f"ppo={m}"]).ppo for m in ("gae", "rloo", "grpo"))
    assert (gae.advantage, gae.samples_per_prompt, gae.kl_in_loss) == ("gae", 1, False)
    assert (rloo.advantage, rloo.samples_per_prompt, rloo.kl_in_loss) == ("rloo", 4, False)
    assert (grpo.advantage, grpo.samples_per_prompt, grpo.kl_in_loss, grpo.kl_estimator) == ("grpo", 4, True, "k3")
    assert gae.total_episodes == rloo.total_episodes == grpo.total_episodes == 320  # the embedded default's
    # the methods sweep's axis: method=<m> picks the ppo option and the policy stage=eval judges
    for method, advantage, policy in (("ppo", "gae", "ppo"), ("rloo", "rloo", "ppo"), ("grpo", "grpo", "ppo")):
        cfg = compose_cfg([f"method={method}"])
        assert (cfg.ppo.advantage, cfg.eval.policy) == (advantage, policy), method
    assert compose_cfg(["method=dpo"]).eval.policy == "dpo"
    assert list(compose_cfg(["method=ppo"]).eval.best_of_n) == [1, 2, 4, 8, 16]


# --------------------------------------------------------------------------- curves along training


def test_heldout_curve_is_measured_without_changing_training(tmp_path):
    """ppo.eval_every=1: a point before the first update (the policy is its reference: KL 0) and
    after each step, with the RM and gold score; training itself is the run without it, figure
    for figure (the held-out samples draw from their own RNG stream)."""
    runs = {}
    for every in (0, 1):
        cfg = _cfg("lora=default", "ppo.total_episodes=16", "ppo.learning_rate=1e-2", f"ppo.eval_every={every}")
        policy, tok = _policy(cfg)
        torch.manual_seed(3)
        trainer = PPOTrainer(
            cfg.ppo,
            policy,
            tok,
            _length_reward,
            PromptSource(QUESTIONS, QUERIES, tok, 64, 0),
            CPU,
            0,
            tmp_path / str(every),
            gold_scorer=lambda q, a: [float(len(x.split())) for x in a],
            heldout=PromptSource(QUESTIONS[:6], QUERIES[:6], tok, 64, 0),
            heldout_tokens=5,
        )
        runs[every] = (trainer.train(), trainer.heldout_rows)
    (plain, none), (curved, rows) = runs[0], runs[1]
    assert none == [] and [r["step"] for r in rows] == [0.0, 1.0, 2.0]
    assert rows[0]["kl_mean"] < 1e-5 and rows[-1]["kl_mean"] > 1e-4  # the policy moved off its reference
    assert all({"reward_mean", "gold_mean", "kl_mean", "reward_stderr"} <= set(r) for r in rows)
    assert curved[-1]["heldout/kl_mean"] == rows[-1]["kl_mean"]
    for a, b in zip(plain, curved):
        assert a["env/reward_mean"] == b["env/reward_mean"] and a["ppo/loss/total"] == b["ppo/loss/total"]


def test_adamw_8bit_keeps_8_bit_moments_and_updates_the_weights(tmp_path):
    """ppo.optimizer=adamw_8bit (full fine-tuning's memory): bitsandbytes' moments are uint8, and a
    step moves the policy as fp32 AdamW's first step does (sign(g) * lr for every weight)."""
    cfg = _cfg("lora=none", "ppo.optimizer=adamw_8bit", "ppo.learning_rate=1e-3", "ppo.ppo_epochs=1")
    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, lambda q, a: torch.tensor([float(len(x)) for x in a]), tmp_path)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer.step()
    big = [trainer.optimizer.state[p] for p in policy.parameters() if p.requires_grad and p.numel() >= 4096]
    assert big and all(s["state1"].dtype == torch.uint8 for s in big)  # bnb keeps fp32 moments below 4096
    moved = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2


def test_gradients_are_freed_after_the_optimisation_phase(tmp_path):
    """Full fine-tuning's gradients are a weights-sized allocation: none may be held after a PPO step
    (through the next rollout, scoring and no-grad pass), while the update still landed."""
    cfg = _cfg("lora=none", "ppo.learning_rate=1e-3", "ppo.ppo_epochs=1")
    policy, tok = _policy(cfg)
    trainer = _trainer(cfg, policy, tok, lambda q, a: torch.tensor([float(len(x)) for x in a]), tmp_path)
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    trainer.step()
    assert all(p.grad is None for p in policy.trainable_parameters())
    assert any(not torch.equal(p, before[n]) for n, p in policy.named_parameters() if p.requires_grad)
