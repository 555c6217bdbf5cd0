"""Reward model stage and RewardScorer: metrics, merging with the score head, tokenizers, padding."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import datasets
import pytest
import torch

from stackllama.metrics import Metrics
from stackllama.models.loader import load_model, load_tokenizer, model_folder
from stackllama.reward import RewardScorer, encode_reward_texts, format_text
from stackllama.task import RunContext
from stackllama.tracking import Tracker
from tests.conftest import compose_cfg

TEMPLATE = "Question: {question}\n\nAnswer: {answer}"
QUESTIONS = [
    "How do I keep my homebrew from getting too bitter?",
    "Why?",
    "What is the best temperature to serve a Belgian tripel, and does the glass matter at all?",
    "Is it safe to drink beer past its best-before date?",
    "How long?",
]
ANSWERS = [
    "Cut the late hop additions and mash a little warmer so more body balances the bitterness.",
    "Because.",
    "Around 8-10 C. A tulip glass keeps the head and the aroma; it matters more than people think. " * 3,
    "Usually yes; it loses flavour rather than becoming unsafe.",
    "Two weeks in the bottle.",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a busy 2-core box threads wait
    on each other; one thread is several times faster there (restored afterwards)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ctx(tmp_path: Path) -> RunContext:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    return RunContext(run_dir, Metrics(run_dir / "metrics.json"), Tracker(), torch.device("cpu"))


def _tiny(overrides: list[str] | None = None):
    cfg = compose_cfg(["model=tiny", "logger=none", *(overrides or [])])
    return cfg, model_folder(cfg.model)


def _train_a_little(model, tok, steps: int = 5, lr: float = 5e-3) -> None:
    """A few pairwise-loss steps so LoRA weights and the score head move off their init."""
    scorer = RewardScorer(model, tok, TEMPLATE, batch_size=8)
    seqs = scorer.encode(QUESTIONS, ANSWERS)
    from stackllama.reward import pad_batch

    ids, mask, pos = pad_batch(seqs, scorer.pad_id, "right")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        r = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[0] - r[1]) - torch.nn.functional.logsigmoid(r[2] - r[3])
        opt.zero_grad()
        loss.backward()
        opt.step()


# --------------------------------------------------------------------------------------
# RewardScorer
# --------------------------------------------------------------------------------------


def test_left_and_right_padding_give_the_same_scores():
    cfg, folder = _tiny()
    tok = load_tokenizer(folder)
    assert tok.pad_token_id == tok.eos_token_id  # the tricky case: the appended EOS looks like padding
    model = load_model(folder, "seq_cls", cfg.quantization, cfg.rm.lora, tokenizer=tok)
    _train_a_little(model, tok, steps=2)
    model.train()
    scores = {}
    for side in ("left", "right"):
        for bs in (1, 2, 16):
            scores[side, bs] = RewardScorer(model, tok, TEMPLATE, batch_size=bs, padding_side=side).score(
                QUESTIONS, ANSWERS
            )
    ref = scores["right", 1]
    assert ref.dtype == torch.float32 and ref.shape == (len(QUESTIONS),)
    for key, value in scores.items():
        torch.testing.assert_close(value, ref, atol=1e-5, rtol=1e-5, msg=f"{key}")
    assert ref.std() > 0  # not a constant (e.g. every row read at a pad position)
    # The tokenizer's own padding side is irrelevant too, and the model's modes are restored.
    assert model.training and all(m.training for m in model.modules())
    tok.padding_side = "left"
    torch.testing.assert_close(RewardScorer(model, tok, TEMPLATE).score(QUESTIONS, ANSWERS), ref, atol=1e-5, rtol=1e-5)


def test_left_truncation_keeps_the_end_of_the_answer():
    cfg, folder = _tiny()
    tok = load_tokenizer(folder)
    model = load_model(folder, "seq_cls", cfg.quantization, None, tokenizer=tok, trainable=False)
    scorer = RewardScorer(model, tok, TEMPLATE, max_length=24)
    full = encode_reward_texts(tok, [format_text(TEMPLATE, QUESTIONS[2], ANSWERS[2])])[0]
    (kept,) = scorer.encode([QUESTIONS[2]], [ANSWERS[2]])
    assert len(full) > 24 and len(kept) == 24
    assert kept == full[-24:]  # the end (answer + EOS) survives; the question is cut
    assert kept[-1] == tok.eos_token_id
    scores = scorer.score(QUESTIONS, ANSWERS)
    assert torch.isfinite(scores).all()


def test_scoring_a_trainable_nf4_model_keeps_its_trainable_weight_layout():
    """bitsandbytes repacks 4-bit weights for CPU inference on an eval/no-grad forward, after
    which no gradient flows through them; scoring a model still being trained must not."""
    import bitsandbytes as bnb

    cfg, folder = _tiny(["quantization=nf4"])
    tok = load_tokenizer(folder)
    model = load_model(folder, "seq_cls", cfg.quantization, cfg.rm.lora, tokenizer=tok)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    before = RewardScorer(model, tok, TEMPLATE).score(QUESTIONS, ANSWERS)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    # gradients still reach the lowest adapters (v_proj -> attention -> 4-bit o_proj)
    model.train()
    scorer = RewardScorer(model, tok, TEMPLATE)
    from stackllama.reward import pad_batch

    ids, mask, pos = pad_batch(scorer.encode(QUESTIONS[:2], ANSWERS[:2]), scorer.pad_id, "right")
    model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.sum().backward()
    first = next(p for n, p in model.named_parameters() if "layers.0." in n and "v_proj.lora_B" in n)
    assert first.grad is not None and first.grad.abs().sum() > 0
    torch.testing.assert_close(scorer.score(QUESTIONS, ANSWERS), before)
    # a frozen scorer is left alone (it may use the fast inference layout)
    frozen = load_model(folder, "seq_cls", cfg.quantization, None, tokenizer=tok, trainable=False)
    saved = [(m, m.support_avx512bf16_for_cpu) for m in frozen.modules() if isinstance(m, bnb.nn.Linear4bit)]
    RewardScorer(frozen, tok, TEMPLATE).score(QUESTIONS[:1], ANSWERS[:1])
    assert all(m.support_avx512bf16_for_cpu == flag for m, flag in saved)


def _word_level_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    tok.padding_side = "left"
    return tok


def test_reward_model_with_its_own_tokenizer(tmp_path):
    """A word-level RM next to a SmolLM2-tokenizer policy: scores come from the RM's own ids."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = _word_level_tokenizer([format_text(TEMPLATE, q, a) for q, a in zip(QUESTIONS, ANSWERS)])
    assert tok.pad_token_id != tok.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    torch.nn.init.normal_(model.score.weight, std=1.0)  # spread the scores out

    policy_tok = load_tokenizer(_tiny()[1])
    text = format_text(TEMPLATE, QUESTIONS[0], ANSWERS[0])
    assert policy_tok(text)["input_ids"] != tok(text)["input_ids"]  # really a different vocabulary

    # Manual reference: one example at a time, no padding, the text + EOS as TRL trains on it.
    manual = []
    for q, a in zip(QUESTIONS, ANSWERS):
        ids = tok(format_text(TEMPLATE, q, a) + tok.eos_token)["input_ids"]
        assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
        with torch.no_grad():
            manual.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    manual = torch.tensor(manual)

    for side in ("left", "right"):
        for bs in (1, 2, 5):
            got = RewardScorer(model, tok, TEMPLATE, batch_size=bs, padding_side=side).score(QUESTIONS, ANSWERS)
            torch.testing.assert_close(got, manual, atol=1e-5, rtol=1e-5)
    # Batch composition: a shuffled, duplicated batch gives each pair the same score.
    order = [4, 0, 2, 2, 1, 3, 0]
    got = RewardScorer(model, tok, TEMPLATE, batch_size=3).score(
        [QUESTIONS[i] for i in order], [ANSWERS[i] for i in order]
    )
    torch.testing.assert_close(got, manual[order], atol=1e-5, rtol=1e-5)

    # Saved as a folder with its tokenizer, loaded back through from_pretrained.
    model.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    loaded = RewardScorer.from_pretrained(tmp_path / "rm", device="cpu", batch_size=2, template=TEMPLATE)
    assert loaded.tokenizer.eos_token == "[EOS]" and loaded.pad_id == tok.pad_token_id
    torch.testing.assert_close(loaded.score(QUESTIONS, ANSWERS), manual, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Merging: the saved folder keeps the trained score head
# --------------------------------------------------------------------------------------


def test_merged_folder_scores_like_the_trained_peft_model(tmp_path):
    from peft import PeftModel

    from stackllama.stages.rm import save_merged

    cfg, folder = _tiny()
    tok = load_tokenizer(folder, padding_side="right")
    model = load_model(folder, "seq_cls", cfg.quantization, cfg.rm.lora, tokenizer=tok)
    assert isinstance(model, PeftModel)
    head = model.base_model.model.score
    init = head.original_module.weight.detach().clone()
    _train_a_little(model, tok)
    trained = head.modules_to_save["default"].weight.detach().clone()
    assert not torch.allclose(trained, init)
    expected = RewardScorer(model, tok, TEMPLATE).score(QUESTIONS, ANSWERS)

    out = tmp_path / "merged"
    out.mkdir()
    assert save_merged(cfg, model, tok, folder, tmp_path / "work", out) == "in_memory"
    assert not (out / "adapter_config.json").exists()  # a plain HF folder, no peft needed

    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    assert set(k for k in saved if "score" in k) == {"score.weight"}
    torch.testing.assert_close(saved["score.weight"], trained)  # the trained head, not the random init
    assert not torch.allclose(saved["score.weight"], init)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    assert config.num_labels == 1 and config.pad_token_id == tok.pad_token_id
    assert "ForSequenceClassification" in json.loads((out / "config.json").read_text())["architectures"][0]

    reloaded = RewardScorer.from_pretrained(out, device="cpu", template=TEMPLATE)
    assert not isinstance(reloaded.model, PeftModel)
    torch.testing.assert_close(reloaded.score(QUESTIONS, ANSWERS), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Dropping too-long pairs
# --------------------------------------------------------------------------------------


def test_too_long_pairs_are_dropped_and_counted():
    from stackllama.stages.rm import encode_train_pairs

    _, folder = _tiny()
    tok = load_tokenizer(folder)
    rng = random.Random(0)
    rows = {"question": [], "chosen": [], "rejected": [], "chosen_pm": [], "rejected_pm": []}
    for i in range(40):
        rows["question"].append(f"Question number {i}?")
        rows["chosen"].append("good " * rng.choice([2, 5, 40]))
        rows["rejected"].append("bad " * rng.choice([2, 5, 40]))
        rows["chosen_pm"].append(2)
        rows["rejected_pm"].append(0)
    data = datasets.Dataset.from_dict(rows)
    max_length = 30

    def too_long(q, a):
        return len(encode_reward_texts(tok, [format_text(TEMPLATE, q, a)])[0]) > max_length

    expected = sum(
        too_long(q, c) or too_long(q, r) for q, c, r in zip(rows["question"], rows["chosen"], rows["rejected"])
    )
    assert 0 < expected < 40
    cols, dropped, examined = encode_train_pairs(data, tok, TEMPLATE, max_length, None, seed=0, chunk=7)
    assert (dropped, examined) == (expected, 40)
    assert len(cols["chosen_ids"]) == 40 - expected
    assert all(len(x) <= max_length for x in cols["chosen_ids"] + cols["rejected_ids"])
    assert all(x[-1] == tok.eos_token_id for x in cols["chosen_ids"])  # as TRL builds them: text + EOS

    capped, dropped_c, examined_c = encode_train_pairs(data, tok, TEMPLATE, max_length, 5, seed=0, chunk=7)
    assert len(capped["chosen_ids"]) == 5 and examined_c == 5 + dropped_c
    assert capped["chosen_ids"] == cols["chosen_ids"][:5]  # same shuffled order, just stopped early
    _, none_dropped, _ = encode_train_pairs(data, tok, TEMPLATE, None, None, seed=0)
    assert none_dropped == 0


def test_grouped_pair_sampler_is_a_shuffled_permutation_of_similar_length_batches():
    from stackllama.reward.batches import GroupedPairSampler

    lengths = [random.Random(i).randint(10, 200) for i in range(37)]
    sampler = GroupedPairSampler([[i] for i in range(37)], lengths, batch_size=4, seed=0)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(37)) and sorted(second) == list(range(37))
    assert first != second  # a new batch order each epoch
    batches = [first[i : i + 4] for i in range(0, 37, 4)]
    spread = sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches)
    assert spread < 0.25 * sum(max(lengths) - min(lengths) for _ in batches)
    assert [lengths[b[0]] for b in batches] != sorted(lengths[b[0]] for b in batches)  # not long-to-short


def test_grouped_pair_sampler_keeps_a_question_s_pairs_together():
    from stackllama.reward.batches import GroupedPairSampler

    rng = random.Random(0)
    groups, start = [], 0
    for _ in range(20):
        size = rng.randint(1, 6)
        groups.append(list(range(start, start + size)))
        start += size
    sampler = GroupedPairSampler(groups, [rng.randint(10, 99) for _ in groups], batch_size=8, seed=1)
    stream = list(sampler)
    assert sorted(stream) == list(range(start))
    batch_of = {pair: k // 8 for k, pair in enumerate(stream)}
    for g in groups:  # a group of <= 8 pairs lands in one batch, or two where it crosses a cut
        assert len({batch_of[i] for i in g}) <= 2, g
    assert sum(len({batch_of[i] for i in g}) == 1 for g in groups) >= len(groups) // 2


def test_dedup_collator_gives_trl_s_pair_rewards_with_fewer_forwards():
    """Same pairs, TRL's collator vs ours: identical logits per pair row, fewer rows forwarded."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    from stackllama.reward.batches import DedupPreferenceCollator, _ExpandedModel

    _, folder = _tiny()
    tok = load_tokenizer(folder, padding_side="right")
    model = load_model(
        folder, "seq_cls", compose_cfg(["model=tiny"]).quantization, None, tokenizer=tok, trainable=False
    )
    ids = encode_reward_texts(tok, [format_text(TEMPLATE, QUESTIONS[0], a) for a in ANSWERS])
    # question 0's answers ranked 0 > 1 > 2 and 3 > 4: 4 pairs over 5 texts (TRL forwards 8)
    examples = [{"chosen_ids": ids[c], "rejected_ids": ids[r]} for c, r in [(0, 1), (0, 2), (1, 2), (3, 4)]]
    theirs = DataCollatorForPreference(pad_token_id=tok.pad_token_id)(examples)
    ours = DedupPreferenceCollator(tok.pad_token_id)(examples)
    assert theirs["input_ids"].shape[0] == 8 and ours["input_ids"].shape[0] == 5
    assert len({len(x) for x in ids}) > 2  # answers of different lengths: chunks are trimmed differently
    with torch.no_grad():
        expected = model(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"]).logits
        index = ours.pop("pair_index")
        got = _ExpandedModel(model, index)(**ours).logits
        chunked = _ExpandedModel(model, index, chunk_size=2)(**ours).logits  # 3 forwards, own widths
    assert got.shape == expected.shape == chunked.shape == (8, 1)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(chunked, expected, atol=1e-5, rtol=1e-5)

    def grads(forward, batch):
        model.zero_grad()
        r_chosen, r_rejected = torch.chunk(forward(**batch).logits.squeeze(-1), 2)
        (-torch.nn.functional.logsigmoid(r_chosen - r_rejected).mean()).backward()  # TRL's loss
        return [p.grad.clone() for p in model.parameters()]

    for p in model.parameters():
        p.requires_grad_(True)
    theirs.pop("margin", None)
    for a, b in zip(grads(model, theirs), grads(_ExpandedModel(model, index, chunk_size=2), ours)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------
# The stage end to end (tiny model, synthetic data)
# --------------------------------------------------------------------------------------


def _stage_cfg(tmp_path: Path, folder: Path | None, extra: list[str] = ()):
    overrides = [
        "model=tiny",
        "logger=none",
        "stage=rm",
        f"artifacts_dir={tmp_path / 'artifacts'}",
        "data.synthetic.num_questions=200",
        "rm.max_train_pairs=16",
        "rm.max_eval_pairs=12",
        "rm.batch_size=4",
        "rm.eval_batch_size=8",
        "rm.max_length=96",
        "rm.logging_steps=2",
        "rm.learning_rate=1e-3",
        *extra,
    ]
    if folder is not None:
        overrides.append(f"rm.model_path={folder}")
    return compose_cfg(overrides)


def test_rm_stage_metrics_and_artifact(tmp_path):
    from stackllama.artifacts import read_manifest
    from stackllama.stages import rm

    _, folder = _tiny()
    cfg = _stage_cfg(tmp_path, folder, ["rm.eval_before=true"])
    ctx = _ctx(tmp_path)
    objective = rm.run(cfg, ctx)
    m = ctx.metrics.values
    for key in (
        "eval/accuracy",
        "eval/margin",
        "eval/gold_accuracy",
        "eval/accuracy_before",
        "data/train_pairs",
        "data/eval_pairs",
        "data/dropped_too_long",
        "train/loss",
        "train/seconds",
        "data/reward_pairs",
        "eval/longer_wins_accuracy",
        "eval/merge_max_abs_diff",
    ):
        assert key in m, key
    assert objective == m["eval/accuracy"]
    assert 0.0 <= m["eval/accuracy"] <= 1.0 and 0.5 < m["eval/gold_accuracy"] <= 1.0
    assert math.isfinite(m["eval/margin"]) and math.isfinite(m["train/loss"]) and m["train/loss"] > 0
    assert m["data/train_pairs"] == 16 and m["data/eval_pairs"] == 12
    # rm.max_length=96 is short for these texts: some pairs were dropped, and counted.
    assert m["data/dropped_too_long"] > 0
    assert m["data/examined_pairs"] == m["data/train_pairs"] + m["data/dropped_too_long"]
    assert m["eval/merge_max_abs_diff"] < 1e-4
    folder_out = Path(m["artifact/path"])
    assert read_manifest(folder_out)["metrics"]["eval/accuracy"] == m["eval/accuracy"]
    assert (folder_out / "model.safetensors").exists() and (folder_out / "tokenizer.json").exists()

    # The artifact is a plain reward model folder PPO can load.
    scorer = RewardScorer.from_pretrained(folder_out, device="cpu", template=cfg.data.prompt_template)
    assert scorer.score(QUESTIONS[:2], ANSWERS[:2]).shape == (2,)

    # Same config again: reused, same metrics, nothing trained.
    ctx2 = _ctx(tmp_path / "again")
    assert rm.run(cfg, ctx2) == objective
    assert ctx2.metrics["artifact/reused"] is True


def test_rm_stage_in_bf16_autocast_saves_the_model_it_trained(tmp_path):
    """Under Trainer's bf16 flag accelerate patches the model's forward with autocast; the
    stage must unwrap it, so the fp32 merge check compares like with like (it failed by
    ~0.02 before the unwrap) and later scoring chooses its own precision."""
    from stackllama.stages import rm

    _, folder = _tiny()
    ctx = _ctx(tmp_path)
    rm.run(_stage_cfg(tmp_path, folder, ["mixed_precision=bf16"]), ctx)
    m = ctx.metrics.values
    assert math.isfinite(m["train/loss"]) and 0.0 <= m["eval/accuracy"] <= 1.0
    assert m["eval/merge_max_abs_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_rm_stage_quantized_base_merges_unquantized(tmp_path, quant):
    from safetensors.torch import load_file

    from stackllama.stages import rm

    _, folder = _tiny()
    cfg = _stage_cfg(tmp_path, folder, [f"quantization={quant}", "rm.max_train_pairs=8", "rm.max_eval_pairs=8"])
    ctx = _ctx(tmp_path)
    rm.run(cfg, ctx)
    m = ctx.metrics.values
    assert m["merge/method"] == "reloaded_unquantized"
    # quantized in memory vs merged unquantized: close, not equal
    assert m["eval/merge_max_abs_diff"] < 0.05 * (1 + abs(m["eval/margin"])) + 0.05
    out = Path(m["artifact/path"])
    saved = load_file(str(out / "model.safetensors"))
    assert saved["score.weight"].dtype == torch.float32  # compute dtype, a plain (dequantized) folder
    assert not any("SCB" in k or "quant" in k or "absmax" in k for k in saved)


@pytest.mark.slow
def test_rm_stage_builds_on_the_sft_artifact(tmp_path):
    """Without rm.model_path the SFT artifact is required (and built first)."""
    from stackllama.stages import rm

    cfg = _stage_cfg(
        tmp_path,
        None,
        [
            "sft.max_steps=2",
            "sft.batch_size=2",
            "sft.seq_length=64",
            "sft.eval_size=4",
            "sft.save_steps=2",
            "sft.num_sample_generations=0",
            "sft.max_train_texts=16",
            "rm.max_train_pairs=8",
            "rm.max_eval_pairs=8",
        ],
    )
    ctx = _ctx(tmp_path)
    rm.run(cfg, ctx)
    m = ctx.metrics.values
    assert "/sft/" in m["upstream/sft/path"] and 0.0 <= m["eval/accuracy"] <= 1.0


def test_grouped_cap_keeps_whole_questions():
    from stackllama.stages.rm import encode_train_pairs, pair_groups

    _, folder = _tiny()
    tok = load_tokenizer(folder)
    rows = {"question": [], "chosen": [], "rejected": [], "chosen_pm": [], "rejected_pm": []}
    for q in range(6):
        for k in range(3):  # 3 pairs per question over 3 answers: a > b > c
            c, r = [("a", "b"), ("a", "c"), ("b", "c")][k]
            rows["question"].append(f"Question {q}?")
            rows["chosen"].append(f"answer {c} to {q}")
            rows["rejected"].append(f"answer {r} to {q}")
            rows["chosen_pm"].append(2)
            rows["rejected_pm"].append(0)
    data = datasets.Dataset.from_dict(rows)
    cols, dropped, examined = encode_train_pairs(data, tok, TEMPLATE, None, 9, seed=0, group_by_question=True)
    assert (len(cols["chosen_ids"]), dropped, examined) == (9, 0, 9)
    groups, lengths = pair_groups(cols, True)
    assert sorted(len(g) for g in groups) == [3, 3, 3] and len(lengths) == 3
    # 9 pairs of 3 questions: 18 token sequences, 9 distinct
    assert len({tuple(x) for x in cols["chosen_ids"] + cols["rejected_ids"]}) == 9
    singles, _ = pair_groups(cols, False)
    assert singles == [[i] for i in range(9)]


@pytest.mark.parametrize("enabled", [False, True])
def test_gradient_checkpointing_setting_reaches_the_trainers(tmp_path, enabled):
    """TRL's configs default gradient checkpointing to True: `false` must be passed, not left out."""
    from stackllama.stages.rm import reward_config
    from stackllama.stages.sft import training_args

    cfg = compose_cfg(
        ["model=tiny", "logger=none", f"rm.gradient_checkpointing={enabled}", f"sft.gradient_checkpointing={enabled}"]
    )
    ctx = _ctx(tmp_path)
    for args in (reward_config(cfg, ctx, tmp_path), training_args(cfg, ctx, tmp_path)):
        assert args.gradient_checkpointing is enabled, type(args).__name__
        assert getattr(args, "activation_checkpointing", enabled) is enabled


def test_min_pm_margin_trains_only_on_clear_pairs_and_counts_the_rest():
    from stackllama.data.recipe import clear_pairs

    pairs = datasets.Dataset.from_dict(
        {
            "question": ["q"] * 4,
            "chosen": ["a", "b", "c", "d"],
            "rejected": ["w", "x", "y", "z"],
            "chosen_pm": [3, 2, 5, 1],
            "rejected_pm": [2, 0, 1, 0],
        }
    )
    assert len(clear_pairs(pairs, 1)) == 4  # the default: every pair
    kept = clear_pairs(pairs, 2)
    assert kept["chosen"] == ["b", "c"]
    assert clear_pairs(pairs, 5)["chosen"] == []


def test_rm_stage_min_pm_margin_counts_the_pairs_it_leaves_out(tmp_path):
    from stackllama.stages import rm

    _, folder = _tiny()
    cfg = _stage_cfg(tmp_path, folder, ["rm.min_pm_margin=3", "rm.max_train_pairs=null", "rm.max_steps=1"])
    ctx = _ctx(tmp_path)
    rm.run(cfg, ctx)
    m = ctx.metrics.values
    assert 0 < m["data/below_pm_margin"] < m["data/reward_pairs"]
    assert m["data/examined_pairs"] == m["data/reward_pairs"] - m["data/below_pm_margin"]
