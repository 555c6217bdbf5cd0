"""Offline Stack-Exchange-like questions and answers whose votes come from a hidden gold score.

Three domains (beer brewing, audio, Python code), each with a small knowledge base of
facts: a question title, the right fact (and its keywords), a wrong fact (and its
keywords) and, for Python ("How do I ... in Python?" questions ask for code), a right and
a wrong code snippet. Each answer is assembled from parts: right fact / wrong fact / no
fact; a ``` code block or not; on-topic sentences and off-topic filler; a length inside or
outside the band; occasionally one sentence repeated.

Votes: ``v = gold_score(question, answer) + N(0, vote_noise)``; with ``u = v + 1`` the vote
score is ``round(2**u - 1)`` for ``u >= 0`` and ``floor(u)`` (negative) below, so that
the pm_score rule of the dumps (``stackllama.data.records.pm_score``: round(log2(1 +
score)), +1 if accepted, -1 if negative) gives ``pm_score ~= round(v) + 1`` (and -1 for
``v < -1``). The answer with the highest ``v`` in a question is accepted with
probability 0.6 when ``v > 1``.

Gold score (``gold_score``, computed from TEXT ONLY, so generations the generator never
wrote can be scored; the question's fact is recovered by finding a knowledge-base title
inside the question text, falling back to the best word overlap)::

    + 2.0 * fraction of the right fact's keywords in the answer
    - 1.5 * fraction of the wrong fact's keywords in the answer
    code: exactly one ``` block with content: +1.0 if the question asks for code,
          -0.25 otherwise; no block: -0.5 if it asks for code, 0 otherwise;
          more than one block (> 2 fences): -1.0 per extra block (at most -3.0);
          an odd number of fences (unclosed block): -0.5 more
    + 0.5 * min(1, distinct topic words of the domain in the answer / 3)
    - 0.4 * min(3, off-topic filler words in the answer)
    + 0.5 if the answer has 20..70 words, else -0.5
    - 3.0 * repeated word-trigram fraction (1 - distinct trigrams / trigrams)
    - 2.0 * max(0, share of the most frequent token - 0.25)   (answers of >= 5 tokens)

A good answer scores about 3 to 4 (2.5 without code when none is asked), a fact-free
on-topic one about 1, a wrong one below 0, and spam (repeated ``` fences, one word
repeated) about -3 to -6. Every feature is visible on the surface (keywords, fences,
topic words, length, repetition), so a small reward model can learn it.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from stackllama.data.records import count_records, log_stats, pm_score

# --------------------------------------------------------------------------------------
# Knowledge base
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    fact_id: str
    domain: str
    title: str
    right: str  # sentence stating the right fact; contains every right keyword
    right_kw: tuple[str, ...]
    wrong: str  # sentence stating a wrong fact; contains every wrong keyword
    wrong_kw: tuple[str, ...]
    right_code: str = ""  # code questions only: body of the right ``` block
    wrong_code: str = ""

    @property
    def asks_code(self) -> bool:
        return self.domain == "python"


KNOWLEDGE_BASE: tuple[Fact, ...] = (
    # ---- beer brewing ----------------------------------------------------------------
    Fact(
        "lager_temp",
        "beer",
        "What temperature should I ferment a lager at?",
        "Ferment a lager between 7 and 13 C, cold and slow, so the yeast stays clean.",
        ("7 and 13 c",),
        "Ferment a lager warm, around 30 C, so it finishes in two days.",
        ("30 c", "two days"),
    ),
    Fact(
        "ale_temp",
        "beer",
        "What temperature should I ferment an ale at?",
        "Most ale yeast works best between 18 and 22 C, which keeps fusel alcohols low.",
        ("18 and 22 c", "fusel"),
        "Ale yeast needs about 35 C or it will not start.",
        ("35 c",),
    ),
    Fact(
        "boil_time",
        "beer",
        "How long should I boil my wort?",
        "Boil the wort for about 60 minutes so DMS is driven off and the hops isomerize.",
        ("60 minutes", "dms"),
        "Boil it for 5 minutes only, a longer boil will burn the sugar.",
        ("5 minutes", "burn the sugar"),
    ),
    Fact(
        "priming",
        "beer",
        "How much priming sugar do I need to bottle 20 liters of beer?",
        "Use about 120 grams of corn sugar for 20 liters to reach normal carbonation.",
        ("120 grams", "corn sugar"),
        "Add 2 kilograms of table sugar so the bottles get really fizzy.",
        ("2 kilograms", "table sugar"),
    ),
    Fact(
        "cloudy",
        "beer",
        "Why is my homebrew cloudy?",
        "That is usually chill haze from proteins; add Irish moss to the boil or cold crash it.",
        ("chill haze", "irish moss"),
        "The yeast died from too much light, so the beer is spoiled.",
        ("too much light", "spoiled"),
    ),
    Fact(
        "dry_hop",
        "beer",
        "What does dry hopping do to a beer?",
        "Dry hopping adds hop aroma without adding bitterness, since the oils are not boiled.",
        ("aroma", "without adding bitterness"),
        "Dry hopping makes the beer stronger in alcohol.",
        ("stronger in alcohol",),
    ),
    Fact(
        "stout_age",
        "beer",
        "How long should I condition a bottled stout?",
        "Give it three weeks at room temperature to carbonate, then a few months in a cellar.",
        ("three weeks", "cellar"),
        "One day in the freezer is enough conditioning for any stout.",
        ("one day", "freezer"),
    ),
    Fact(
        "sanitize",
        "beer",
        "How should I sanitize my fermenter?",
        "Clean it first, then use a no-rinse sanitizer such as Star San for two minutes of contact.",
        ("no-rinse", "star san"),
        "Rinsing with warm tap water is enough, bacteria cannot survive in beer.",
        ("tap water", "cannot survive"),
    ),
    # ---- audio -----------------------------------------------------------------------
    Fact(
        "sample_rate",
        "audio",
        "What sample rate should I record music at?",
        "Record at 44.1 kHz or 48 kHz; higher rates rarely make an audible difference.",
        ("44.1 khz", "48 khz"),
        "Record at 8 kHz, nobody can hear anything above that.",
        ("8 khz",),
    ),
    Fact(
        "bit_depth",
        "audio",
        "What bit depth should I use for recording?",
        "Use 24 bit, it gives you plenty of headroom above the noise floor.",
        ("24 bit", "headroom"),
        "Use 8 bit, more bits only make the files bigger.",
        ("8 bit", "files bigger"),
    ),
    Fact(
        "hum",
        "audio",
        "Why does my microphone hum?",
        "A steady hum is usually a ground loop; use a balanced XLR cable and one power strip.",
        ("ground loop", "balanced"),
        "It hums because the microphone is too quiet, turn it up.",
        ("too quiet",),
    ),
    Fact(
        "phantom",
        "audio",
        "What is phantom power used for?",
        "Phantom power sends 48 volts down the cable to power condenser microphones.",
        ("48 volts", "condenser"),
        "Phantom power makes dynamic microphones louder and warmer.",
        ("dynamic microphones louder",),
    ),
    Fact(
        "clipping",
        "audio",
        "How do I stop clipping when recording vocals?",
        "Lower the input gain so the peaks stay around -12 dBFS, and back off the microphone.",
        ("input gain", "-12 dbfs"),
        "Turn the gain up until the meter stays red, clipping adds warmth.",
        ("stays red", "adds warmth"),
    ),
    Fact(
        "compressor",
        "audio",
        "What does a compressor do?",
        "A compressor reduces dynamic range by turning down peaks above a threshold.",
        ("dynamic range", "threshold"),
        "A compressor adds reverb and echo to the track.",
        ("reverb", "echo"),
    ),
    Fact(
        "master_format",
        "audio",
        "Should I use MP3 or WAV files for mastering?",
        "Master from WAV files because they are lossless; export the MP3 only at the end.",
        ("lossless", "only at the end"),
        "MP3 at 128 kbps sounds the same, so master from that.",
        ("128 kbps", "sounds the same"),
    ),
    Fact(
        "monitors",
        "audio",
        "Where should I place my studio monitors?",
        "Put the monitors in an equilateral triangle with your head, tweeters at ear height.",
        ("equilateral triangle", "ear height"),
        "Push the monitors into the corners facing the wall.",
        ("into the corners", "facing the wall"),
    ),
    # ---- python (code questions) ----------------------------------------------------
    Fact(
        "reverse_list",
        "python",
        "How do I reverse a list in Python?",
        "Slice it with items[::-1] or loop over reversed(items).",
        ("[::-1]", "reversed"),
        "Call items.sort() and the list comes back backwards.",
        ("items.sort()",),
        right_code="items = [3, 1, 2]\nprint(items[::-1])",
        wrong_code="items = [3, 1, 2]\nitems.sort()",
    ),
    Fact(
        "read_lines",
        "python",
        "How do I read a file line by line in Python?",
        "Use with open(path) as f: and then for line in f: to stream the lines.",
        ("with open", "for line in"),
        "Call f.readall() which returns each line one by one.",
        ("readall",),
        right_code="with open(path) as f:\n    for line in f:\n        print(line.rstrip())",
        wrong_code="f = file(path)\nlines = f.readall()",
    ),
    Fact(
        "merge_dicts",
        "python",
        "How do I merge two dictionaries in Python?",
        "Write merged = {**a, **b} or, on Python 3.9+, merged = a | b.",
        ("{**a, **b}", "a | b"),
        "Just add them with a + b like lists.",
        ("a + b",),
        right_code="a = {'x': 1}\nb = {'y': 2}\nmerged = {**a, **b}",
        wrong_code="merged = a + b",
    ),
    Fact(
        "key_exists",
        "python",
        "How do I check if a key exists in a dictionary in Python?",
        "Use the in operator, if key in d:, or d.get(key) when a default helps.",
        ("key in d", "d.get("),
        "Call d.has_key(key), it is the standard way.",
        ("has_key",),
        right_code="d = {'a': 1}\nif 'a' in d:\n    print(d.get('a'))",
        wrong_code="if d.has_key('a'):\n    print('yes')",
    ),
    Fact(
        "dedupe",
        "python",
        "How do I remove duplicates from a list in Python?",
        "Use list(dict.fromkeys(items)), which keeps the order, unlike a set.",
        ("dict.fromkeys", "keeps the order"),
        "Lists have items.unique() for that.",
        ("items.unique()",),
        right_code="items = [1, 2, 1, 3]\nunique = list(dict.fromkeys(items))",
        wrong_code="unique = items.unique()",
    ),
    Fact(
        "format_float",
        "python",
        "How do I format a float to two decimal places in Python?",
        "Use an f-string with a format spec: f'{x:.2f}' gives two decimals.",
        (":.2f",),
        "Call int(x) and it keeps two decimals.",
        ("int(x)",),
        right_code="x = 3.14159\nprint(f'{x:.2f}')",
        wrong_code="x = 3.14159\nprint(int(x))",
    ),
    Fact(
        "today",
        "python",
        "How do I get the current date in Python?",
        "Import datetime and call date.today() for the current date.",
        ("date.today()",),
        "Call time.sleep() and it returns the date.",
        ("time.sleep",),
        right_code="from datetime import date\nprint(date.today())",
        wrong_code="import time\nprint(time.sleep(1))",
    ),
    Fact(
        "sort_dicts",
        "python",
        "How do I sort a list of dictionaries by a key in Python?",
        "Use sorted(rows, key=lambda r: r['age']) to sort by that key.",
        ("key=lambda", "sorted("),
        "Call rows.sort_by('age') on the list.",
        ("sort_by",),
        right_code="rows = [{'age': 3}, {'age': 1}]\nprint(sorted(rows, key=lambda r: r['age']))",
        wrong_code="rows.sort_by('age')",
    ),
)

FACTS_BY_ID = {f.fact_id: f for f in KNOWLEDGE_BASE}
DOMAINS = ("beer", "audio", "python")

TOPIC_WORDS: dict[str, tuple[str, ...]] = {
    "beer": ("beer", "yeast", "wort", "hops", "malt", "fermentation", "brew", "batch", "bottle", "carbonation"),
    "audio": (
        "signal",
        "microphone",
        "mix",
        "track",
        "recording",
        "level",
        "interface",
        "speakers",
        "noise",
        "frequency",
    ),
    "python": ("python", "function", "list", "code", "variable", "loop", "module", "interpreter", "string", "object"),
}

ON_TOPIC: dict[str, tuple[str, ...]] = {
    "beer": (
        "Healthy yeast and a clean fermentation matter more than fancy malt.",
        "Take notes on every batch so you can repeat what worked.",
        "Fresh hops and good malt make a noticeable difference in the beer.",
        "Keep the wort covered while it cools to avoid infection.",
        "Patience pays off, the beer usually improves in the bottle.",
        "A hydrometer reading tells you when fermentation has really finished.",
        "Your local homebrew shop can help you pick yeast for the style.",
        "Let the batch rest before you judge the carbonation.",
    ),
    "audio": (
        "Always check the level on your interface before you press record.",
        "Good speakers in a treated room tell you more than any plugin.",
        "Listen to the track on headphones too, so noise does not hide.",
        "The signal chain matters, fix problems at the microphone first.",
        "Reference your mix against a commercial recording you like.",
        "Watch the low frequency build up, it muddies the whole mix.",
        "A quiet room lowers the noise more than any software fix.",
        "Keep the interface drivers updated to avoid dropouts in the recording.",
    ),
    "python": (
        "This works on any recent Python interpreter without extra modules.",
        "Keep the code readable, a short function is easier to test.",
        "The same idea works for any list or string you pass in.",
        "You can wrap it in a function and reuse the code in your module.",
        "Avoid naming a variable list, it shadows the builtin object.",
        "Try it in the interpreter first to see what the loop returns.",
        "The Python documentation explains this function in more detail.",
        "It is a common idiom, so other readers of your code will know it.",
    ),
}

FILLER_WORDS = ("weather", "cat", "movie", "weekend", "vacation", "lunch", "football", "traffic", "birthday", "garden")
FILLER = (
    "Anyway, the weather has been lovely this week.",
    "My cat keeps walking across the keyboard while I type.",
    "I watched a great movie about pirates yesterday.",
    "I am going hiking with friends this weekend.",
    "We are planning a vacation to the sea next year.",
    "I had a huge sandwich for lunch today.",
    "Did anyone see the football game on Sunday?",
    "The traffic on my way home was terrible again.",
    "It is my sister's birthday tomorrow, so I am busy.",
    "My garden is finally full of tomatoes.",
)

INTROS: dict[str, tuple[str, ...]] = {
    "beer": (
        "I am brewing my first batch at home and want to get it right.",
        "I have brewed a few extract kits and now I am trying all grain.",
        "My last beer turned out strange and I want to understand why.",
        "I read conflicting advice on homebrew forums.",
    ),
    "audio": (
        "I am setting up a small home studio for my band.",
        "I record podcasts in a spare room with a USB interface.",
        "My recordings sound amateur and I want to fix the basics.",
        "I read conflicting advice in audio forums.",
    ),
    "python": (
        "I am new to Python and this comes up in my script all the time.",
        "I am porting some old code and want the idiomatic way.",
        "I tried a few things from memory but none of them worked.",
        "I want a short and readable solution.",
    ),
}

NO_FACT_CODE = {
    "python": "print('hello')",
    "beer": "batch notes: taste it and write it down",
    "audio": "signal -> interface -> computer",
}

WORD_BAND = (20, 70)
VOTE_OFFSET = 1.0  # a fact-free on-topic answer (gold ~0.5) gets a few upvotes, not downvotes

# Gold weights (documented in the module docstring).
W_RIGHT, W_WRONG = 2.0, 1.5
W_CODE_ASKED, W_CODE_UNASKED, W_NO_CODE_ASKED = 1.0, -0.25, -0.5
W_EXTRA_BLOCK, MAX_EXTRA_BLOCK, W_UNCLOSED = 1.0, 3.0, 0.5
W_TOPIC, W_FILLER, MAX_FILLER = 0.5, 0.4, 3
W_LENGTH = 0.5
W_TRIGRAM, W_TOP_TOKEN, TOP_TOKEN_FREE = 3.0, 2.0, 0.25

# --------------------------------------------------------------------------------------
# Gold score (text only)
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"```|[a-z0-9]+")
_WORD = re.compile(r"[a-z0-9]+")


def _normalize(text: str) -> str:
    return " ".join(text.lower().split())


def _kw_pattern(keyword: str) -> re.Pattern:
    kw = keyword.lower()
    head = r"(?<![\w])" if re.match(r"\w", kw[0]) else ""
    tail = r"(?![\w])" if re.match(r"\w", kw[-1]) else ""
    return re.compile(head + re.escape(kw) + tail)


_KW_CACHE: dict[str, re.Pattern] = {}


def _has_kw(text_lower: str, keyword: str) -> bool:
    pat = _KW_CACHE.get(keyword)
    if pat is None:
        pat = _KW_CACHE[keyword] = _kw_pattern(keyword)
    return pat.search(text_lower) is not None


_TITLES = [(_normalize(f.title), f) for f in KNOWLEDGE_BASE]


def match_fact(question: str) -> Fact | None:
    """The knowledge-base fact a question asks about, from its text only."""
    q = _normalize(question)
    for title, fact in _TITLES:
        if title in q:
            return fact
    q_words = set(_WORD.findall(q))
    best, best_overlap = None, 0.0
    for title, fact in _TITLES:
        t_words = set(_WORD.findall(title))
        overlap = len(q_words & t_words) / len(t_words)
        if overlap > best_overlap:
            best, best_overlap = fact, overlap
    return best if best_overlap >= 0.8 else None


def gold_features(question: str, answer: str) -> dict[str, float]:
    """The gold score's weighted terms (they sum to ``gold_score``)."""
    fact = match_fact(question)
    low = answer.lower()
    feats: dict[str, float] = {}
    if fact is not None:
        feats["right_fact"] = W_RIGHT * sum(_has_kw(low, k) for k in fact.right_kw) / len(fact.right_kw)
        feats["wrong_fact"] = -W_WRONG * sum(_has_kw(low, k) for k in fact.wrong_kw) / len(fact.wrong_kw)
        asks_code, domain = fact.asks_code, fact.domain
    else:
        feats["right_fact"] = feats["wrong_fact"] = 0.0
        asks_code = re.search(r"\bin python\b", question.lower()) is not None
        domain = None

    fences = answer.count("```")
    code = 0.0
    if fences > 2:
        code -= min(MAX_EXTRA_BLOCK, W_EXTRA_BLOCK * ((fences - 1) // 2))
    elif fences == 2:
        inner = answer.split("```")[1]
        inner_lines = inner.split("\n", 1)  # drop a language tag line like ```python
        body = inner_lines[1] if len(inner_lines) > 1 else inner_lines[0]
        if body.strip():
            code += W_CODE_ASKED if asks_code else W_CODE_UNASKED
        elif asks_code:
            code += W_NO_CODE_ASKED
    elif asks_code:
        code += W_NO_CODE_ASKED
    if fences % 2:
        code -= W_UNCLOSED
    feats["code"] = code

    words = _WORD.findall(low)
    word_set = set(words)
    if domain is None:
        topic_hits = max(len(word_set & set(TOPIC_WORDS[d])) for d in DOMAINS)
    else:
        topic_hits = len(word_set & set(TOPIC_WORDS[domain]))
    feats["topic"] = W_TOPIC * min(1.0, topic_hits / 3)
    feats["filler"] = -W_FILLER * min(MAX_FILLER, sum(w in FILLER_WORDS for w in words))
    feats["length"] = W_LENGTH if WORD_BAND[0] <= len(words) <= WORD_BAND[1] else -W_LENGTH

    tokens = _TOKEN.findall(low)
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    feats["repetition"] = -W_TRIGRAM * (1 - len(set(trigrams)) / len(trigrams)) if trigrams else 0.0
    if len(tokens) >= 5:
        top = max(tokens.count(t) for t in set(tokens)) / len(tokens)
        feats["top_token"] = -W_TOP_TOKEN * max(0.0, top - TOP_TOKEN_FREE)
    else:
        feats["top_token"] = 0.0
    return feats


def gold_score(question: str, answer: str) -> float:
    """Hidden quality of ``answer`` to ``question`` (see the module docstring)."""
    return float(sum(gold_features(question, answer).values()))


def gold_score_batch(questions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """``gold_score`` for aligned lists of questions and answers."""
    if len(questions) != len(answers):
        raise ValueError(f"gold_score_batch: {len(questions)} questions but {len(answers)} answers")
    return [gold_score(q, a) for q, a in zip(questions, answers)]


# --------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------


@dataclass
class AnswerPlan:
    """The hidden attributes one generated answer was built from."""

    fact: str  # right | wrong | none
    code: bool
    topic: int
    filler: int
    length: str  # band | short | long
    repeat: bool
    sentences: list[str] = field(default_factory=list)


def _plan_answer(rng: random.Random, fact: Fact) -> AnswerPlan:
    kind = rng.choices(("right", "wrong", "none"), weights=(0.4, 0.25, 0.35))[0]
    code = rng.random() < (0.65 if fact.asks_code else 0.1)
    length = rng.choices(("band", "short", "long"), weights=(0.75, 0.15, 0.10))[0]
    topic = {"band": rng.randint(1, 3), "short": 0, "long": rng.randint(6, 8)}[length]
    filler = 0 if rng.random() < 0.6 else rng.randint(1, 2)
    if length == "short":
        filler = 0
    repeat = rng.random() < 0.12 and length != "long"
    return AnswerPlan(kind, code, topic, filler, length, repeat)


def _render_answer(rng: random.Random, fact: Fact, plan: AnswerPlan) -> str:
    sentences: list[str] = []
    if plan.fact == "right":
        sentences.append(fact.right)
    elif plan.fact == "wrong":
        sentences.append(fact.wrong)
    topic = rng.sample(ON_TOPIC[fact.domain], min(plan.topic, len(ON_TOPIC[fact.domain])))
    if not sentences and not topic:  # a short answer with no fact still says something
        topic = [rng.choice(ON_TOPIC[fact.domain])]
    sentences.extend(topic)
    for filler in rng.sample(FILLER, plan.filler):
        sentences.insert(rng.randint(1 if sentences else 0, len(sentences)), filler)
    if plan.length == "long" and plan.filler == 0 and rng.random() < 0.3:
        sentences.insert(rng.randint(1, len(sentences)), rng.choice(FILLER))
    if plan.repeat:
        victim = rng.choice(sentences[:3])
        at = sentences.index(victim) + 1
        sentences[at:at] = [victim] * rng.randint(2, 3)
    plan.sentences = sentences
    text = " ".join(sentences)
    if plan.code:
        if plan.fact == "right" and fact.right_code:
            snippet = fact.right_code
        elif plan.fact == "wrong" and fact.wrong_code:
            snippet = fact.wrong_code
        else:
            snippet = NO_FACT_CODE[fact.domain]
        lang = "python" if fact.asks_code else ""
        # The block goes after the first sentence, like most Stack Exchange answers.
        first, _, rest = text.partition(". ")
        block = f"\n\n```{lang}\n{snippet}\n```\n\n"
        text = (first + "." + block + rest).strip() if rest else (text + block).strip()
    return text


def _votes_to_score(v: float) -> int:
    """Vote score whose pm_score is about round(v) (see the module docstring)."""
    v = v + VOTE_OFFSET
    if v >= 0:
        return int(round(2.0**v - 1.0))
    return int(math.floor(v))


def _question_text(rng: random.Random, fact: Fact) -> str:
    intro = rng.choice(INTROS[fact.domain])
    return f"{fact.title}\n\n{intro}"


def generate_records(data_cfg: Any) -> tuple[list[dict], dict[str, Any]]:
    """Generate ``data_cfg.synthetic.num_questions`` records, deterministic by ``data_cfg.seed``."""
    syn = data_cfg.synthetic
    seed = int(data_cfg.seed)
    if syn.min_answers > syn.max_answers or syn.min_answers < 1:
        raise ValueError(
            f"data.synthetic needs 1 <= min_answers <= max_answers, got {syn.min_answers}, {syn.max_answers}"
        )
    rng = random.Random(f"stackllama-synthetic-{seed}")
    records = []
    for i in range(int(syn.num_questions)):
        fact = KNOWLEDGE_BASE[rng.randrange(len(KNOWLEDGE_BASE))]
        question = _question_text(rng, fact)
        n_answers = rng.randint(int(syn.min_answers), int(syn.max_answers))
        answers, plans, votes = [], [], []
        seen = set()
        for j in range(n_answers):
            for _ in range(10):  # avoid identical answers within a question
                plan = _plan_answer(rng, fact)
                text = _render_answer(rng, fact, plan)
                if text not in seen:
                    break
            seen.add(text)
            gold = gold_score(question, text)
            v = gold + rng.gauss(0.0, float(syn.vote_noise))
            plans.append(
                {
                    "fact": plan.fact,
                    "code": plan.code,
                    "length": plan.length,
                    "filler": plan.filler,
                    "repeat": plan.repeat,
                    "gold": round(gold, 4),
                }
            )
            votes.append(v)
            answers.append({"answer_id": f"s{seed}-{i}-{j}", "text": text, "score": _votes_to_score(v)})
        best = max(range(n_answers), key=lambda k: votes[k])
        accept = votes[best] > 1.0 and rng.random() < 0.6
        for k, ans in enumerate(answers):
            ans["selected"] = accept and k == best
            ans["pm_score"] = pm_score(ans["score"], ans["selected"])
        records.append(
            {
                "qid": f"synthetic-{seed}-{i}",
                "question": question,
                "answers": [{k: a[k] for k in ("answer_id", "pm_score", "selected", "text", "score")} for a in answers],
                "date": f"2020-01-01T00:00:{i % 60:02d}",
                "metadata": {
                    "source": "synthetic",
                    "domain": fact.domain,
                    "fact_id": fact.fact_id,
                    "asks_code": fact.asks_code,
                    "answer_plans": plans,
                },
            }
        )
    stats: dict[str, Any] = {}
    count_records(records, stats)
    log_stats(stats, f"synthetic corpus (seed {seed})")
    return records, stats
