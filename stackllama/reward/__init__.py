"""``RewardScorer``: the one way PPO, evaluation and the RM stage turn (question, answer) into a score.

Why a class of our own instead of a ``pipeline("sentiment-analysis")`` as in TRL's
StackLlama script:

* **Its own tokenizer.** Every text is formatted with the prompt template and tokenized
  again with the *reward model's* tokenizer, so the policy and the reward model may use
  different vocabularies (TRL's old PPO pipeline fed the policy's token ids to the RM and
  so required the same tokenizer).
* **Same input as training.** TRL's ``RewardTrainer`` appends the tokenizer's EOS token to
  every non-conversational text before tokenizing; the scorer does exactly the same, so a
  score at inference is read from the same token sequence the model was trained on.
* **Left truncation.** A text longer than ``max_length`` tokens keeps its *end* (the end
  of the answer and the appended EOS, with a leading BOS kept when the tokenizer adds
  one); the start of the question is what gets cut. A reward model judges the answer, and
  its score is read at the last token, so that end must survive.
* **Read at the last real token, whatever the padding side.** Batches are padded by the
  scorer itself with the id in ``model.config.pad_token_id`` (the id the classifier uses
  to find "the rightmost token that is not padding"), on the side asked for, and with
  ``position_ids`` counted from the attention mask, so left and right padding give the
  same scores and a score never depends on which other texts share its batch. When the
  pad token is also the EOS token (Llama/SmolLM2 tokenizers), the appended EOS is taken
  for padding and the score is read at the last answer token: exactly where training
  read it, because training pads and pools the same way.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from stackllama import precision
from stackllama.data.recipe import format_text  # the SFT text is the text the RM scores
from stackllama.models.loader import text_config
from stackllama.models.padding import pad

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Question: {question}\n\nAnswer: {answer}"


def with_eos(text: str, tokenizer: Any) -> str:
    """Append the tokenizer's EOS token the way TRL's RewardTrainer does for plain texts."""
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        return text + eos
    return text


def encode_reward_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids exactly as ``RewardTrainer`` builds them: ``tokenizer(text + eos)["input_ids"]``."""
    if not texts:
        return []
    return list(tokenizer([with_eos(t, tokenizer) for t in texts])["input_ids"])


def truncate_left(ids: list[int], max_length: int, bos_token_id: int | None) -> list[int]:
    """Keep the last ``max_length`` ids (the end of the answer); keep a leading BOS if any."""
    if max_length is None or len(ids) <= max_length:
        return ids
    if bos_token_id is not None and ids and ids[0] == bos_token_id and max_length > 1:
        return [ids[0]] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]


def pad_batch(
    seqs: Sequence[Sequence[int]], pad_id: int, side: str = "right"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and mask-derived ``position_ids`` for ``seqs``."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("cannot score an empty token sequence")
    ids, mask = pad(seqs, pad_id, side)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def _saved_dtype(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


class RewardScorer:
    """Batched, no-grad scores from a 1-label sequence-classification reward model.

    ``RewardScorer(model, tokenizer, template, batch_size=16, max_length=512, device=None)``
    wraps a model already in memory (a plain ``...ForSequenceClassification`` or a peft
    ``PeftModelForSequenceClassification``); ``RewardScorer.from_pretrained(path, ...)``
    loads a merged reward-model folder with its own tokenizer. ``score(questions, answers)``
    returns a float32 CPU tensor of shape ``[N]``.

    ``padding_side`` (default: the tokenizer's) changes nothing but the layout of a batch.
    ``mixed_precision`` (no | bf16 | fp16) runs the forward passes under that autocast.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        template: str = DEFAULT_TEMPLATE,
        batch_size: int = 16,
        max_length: int = 512,
        device: torch.device | str | None = None,
        padding_side: str | None = None,
        mixed_precision: str = "no",
    ):
        if "{question}" not in template or "{answer}" not in template:
            raise ValueError(f"reward template must contain {{question}} and {{answer}}: {template!r}")
        if int(batch_size) < 1 or int(max_length) < 2:
            raise ValueError("batch_size must be >= 1 and max_length >= 2")
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.padding_side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
        self.device = torch.device(device) if device is not None else _model_device(model)
        self.mixed_precision = mixed_precision

        config = text_config(model.config)
        if getattr(config, "num_labels", 1) != 1:
            raise ValueError(f"a reward model has one output; this one has num_labels={config.num_labels}")
        pad_id = getattr(config, "pad_token_id", None)
        if pad_id is None:
            # The classifier cannot find the last token of a padded row without a pad id.
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            if pad_id is None:
                raise ValueError("neither the reward model's config nor its tokenizer defines a pad/eos token")
            config.pad_token_id = pad_id
            log.warning("reward model config had no pad_token_id; using %d from its tokenizer", pad_id)
        elif tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad_id:
            log.warning(
                "reward tokenizer pads with id %s but the model pools on pad id %s; batches are padded "
                "with the model's id",
                tokenizer.pad_token_id,
                pad_id,
            )
        self.pad_id = int(pad_id)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        batch_size: int = 16,
        max_length: int = 512,
        template: str = DEFAULT_TEMPLATE,
        quant_cfg: Any = None,
        dtype: str | None = None,
        padding_side: str | None = None,
        mixed_precision: str = "no",
    ) -> "RewardScorer":
        """Load a merged reward-model folder (weights + score head + tokenizer), frozen, in eval mode.

        Raises ``NotAModelFolder`` when ``path`` is not a model folder or its checkpoint holds no
        score head (``stackllama.models.resolve.check_reward_model``).

        ``quant_cfg`` (a ``quantization`` config node) loads the weights 8-bit/NF4; ``dtype``
        defaults to the dtype the folder was saved in.
        """
        from stackllama.config import QuantizationConfig
        from stackllama.models.loader import DTYPES, load_model, load_tokenizer
        from stackllama.models.resolve import check_reward_model

        # A causal-LM folder would load too, with a randomly initialised score head: refuse it.
        check_reward_model(path)
        tokenizer = load_tokenizer(path, padding_side=padding_side or "right")
        if dtype is None:
            saved = _saved_dtype(Path(path))
            dtype = saved if saved in DTYPES else "float32"
        quant = quant_cfg if quant_cfg is not None else QuantizationConfig(mode="none")
        model = load_model(
            path, "seq_cls", quant, None, dtype=dtype, device=device, tokenizer=tokenizer, trainable=False
        )
        return cls(
            model,
            tokenizer,
            template,
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            padding_side=padding_side,
            mixed_precision=mixed_precision,
        )

    # -- encoding -----------------------------------------------------------------------

    def texts(self, questions: Sequence[str], answers: Sequence[str]) -> list[str]:
        if len(questions) != len(answers):
            raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
        return [format_text(self.template, q, a) for q, a in zip(questions, answers)]

    def encode(self, questions: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
        """Token ids the model scores: template + EOS, RM tokenizer, left-truncated."""
        ids = encode_reward_texts(self.tokenizer, self.texts(questions, answers))
        bos = getattr(self.tokenizer, "bos_token_id", None)
        return [truncate_left(list(x), self.max_length, bos) for x in ids]

    # -- scoring ------------------------------------------------------------------------

    def score_ids(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores for pre-encoded sequences (see ``encode``), batched longest-first."""
        n = len(seqs)
        out = torch.empty(n, dtype=torch.float32)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: -len(seqs[i]))  # similar lengths share a batch: less padding
        modes = [(m, m.training) for m in self.model.modules()] if hasattr(self.model, "modules") else []
        self.model.eval()
        try:
            with torch.no_grad(), precision.autocast(self.mixed_precision, self.device):
                for start in range(0, n, self.batch_size):
                    idx = order[start : start + self.batch_size]
                    ids, mask, pos = pad_batch([seqs[i] for i in idx], self.pad_id, self.padding_side)
                    logits = self.model(
                        input_ids=ids.to(self.device),
                        attention_mask=mask.to(self.device),
                        position_ids=pos.to(self.device),
                        use_cache=False,
                    ).logits
                    out[torch.tensor(idx)] = logits.reshape(len(idx), -1)[:, 0].float().cpu()
        finally:
            for module, mode in modes:  # restore each module's own train/eval flag
                module.training = mode
        return out

    def score(self, questions: Sequence[str], answers: Sequence[str]) -> torch.Tensor:
        """float32 tensor ``[N]``: the reward of each answer to its question."""
        return self.score_ids(self.encode(list(questions), list(answers)))

    __call__ = score


def pairwise_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Accuracy (chosen scored strictly higher) and mean margin over preference pairs."""
    if chosen.numel() == 0:
        return {"accuracy": float("nan"), "margin": float("nan")}
    diff = chosen.float() - rejected.float()
    return {"accuracy": float((diff > 0).float().mean()), "margin": float(diff.mean())}
