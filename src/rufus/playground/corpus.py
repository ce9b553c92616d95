"""The built-in offline task's text: requests to a small assistant and responses of measurable quality.

A prompt is a short request on one of eight topics ("Tell me about owls.", "What is 3 plus 4?").
A response is composed from phrase banks, each of five qualities switched on or off:

``on_topic``    the body talks about the prompt's topic (off: sentences about another topic mixed in)
``polite``      polite opener/closer ("Sure!", "Hope this helps.") vs rude ones ("Ugh.", "Obviously.")
``concise``     about 8-20 words (off: neutral filler rambling on to about 30-50 words)
``repetitive``  a short chunk of the body repeated two or three times
``answers``     a sentence that answers the request (for arithmetic, the correct sum) vs a dodge

`measure` scores those qualities back FROM THE TEXT ALONE (nothing is carried as a hidden label), so
any model's samples, garbled ones included, can be scored; `rufus.playground.taste` turns the scores
into a gold taste and simulated annotators. The flags given to `make_response` are kept in the corpus
rows only for inspection and tests.

Everything is pure Python and deterministic from a seed (``random.Random``).
"""

from __future__ import annotations

import random
import re
from typing import Any

# --- topics ------------------------------------------------------------------------------------------
# Each topic: `subjects` (what a request is about), `facts` (words an answer uses), `templates` (requests,
# "{s}" = subject). Topic vocabularies are disjoint, so a word names at most one topic.
TOPICS: dict[str, dict[str, list[str]]] = {
    "weather": {
        "subjects": ["rain", "snow", "fog", "wind", "storms", "hail"],
        "facts": ["clouds", "cold", "warm", "air", "droplets", "sky", "umbrella", "temperature", "forecast"],
        "templates": ["What causes {s}?", "Tell me about {s}.", "How should I dress for {s}?", "Why do we get {s}?"],
    },
    "cooking": {
        "subjects": ["rice", "pasta", "eggs", "soup", "bread", "pancakes"],
        "facts": ["boil", "salt", "pan", "oven", "heat", "stir", "butter", "minutes", "simmer"],
        "templates": [
            "What is a good way to cook {s}?",
            "How do I make {s}?",
            "Any tips for cooking {s}?",
            "Tell me how to prepare {s}.",
        ],
    },
    "animals": {
        "subjects": ["owls", "cats", "dogs", "horses", "whales", "foxes"],
        "facts": ["hunt", "fur", "feathers", "night", "mice", "ocean", "paws", "sleep", "wild"],
        "templates": ["Tell me about {s}.", "What do {s} eat?", "Where do {s} live?", "Why are {s} interesting?"],
    },
    "colours": {
        "subjects": ["red", "blue", "green", "yellow", "purple", "orange"],
        "facts": ["paint", "light", "mix", "bright", "shade", "hue", "rainbow", "dark", "pigment"],
        "templates": [
            "What goes well with {s}?",
            "Tell me about the colour {s}.",
            "How do I mix {s}?",
            "Why do people like {s}?",
        ],
    },
    "arithmetic": {
        # numbers also count as arithmetic words (see `_topic_of_word`)
        "subjects": [],
        "facts": ["plus", "sum", "add", "total", "equals", "numbers"],
        "templates": [
            "What is {a} plus {b}?",
            "Add {a} and {b}.",
            "What do you get when you add {a} and {b}?",
            "Can you sum {a} and {b} for me?",
        ],
    },
    "travel": {
        "subjects": ["trains", "flights", "hotels", "maps", "luggage", "beaches"],
        "facts": ["ticket", "journey", "passport", "booking", "route", "station", "airport", "trip", "pack"],
        "templates": [
            "Any advice about {s}?",
            "Tell me about {s}.",
            "How do I choose {s}?",
            "What should I know about {s}?",
        ],
    },
    "music": {
        "subjects": ["guitar", "piano", "drums", "violin", "singing", "jazz"],
        "facts": ["chords", "rhythm", "melody", "practice", "notes", "tune", "scales", "tempo", "song"],
        "templates": ["How do I learn {s}?", "Tell me about {s}.", "What is hard about {s}?", "Any tips for {s}?"],
    },
    "plants": {
        "subjects": ["roses", "tomatoes", "ferns", "cactus", "tulips", "herbs"],
        "facts": ["soil", "sunlight", "water", "roots", "leaves", "seeds", "garden", "prune", "compost"],
        "templates": ["How do I grow {s}?", "Tell me about {s}.", "How often should I water {s}?", "What do {s} need?"],
    },
}

# Answer sentences for the worded topics: {S}/{s} = subject, {f1}.. = distinct fact words of the topic.
ANSWER_TEMPLATES = [
    "When it comes to {s}, it is all about {f1}, {f2} and {f3}.",
    "With {s}, think of {f1} and {f2} first.",
    "The key to {s} is {f1}, then {f2}.",
    "For {s}, {f1} and {f2} matter most, and a little {f3}.",
]
SUM_TEMPLATES = ["{a} plus {b} is {c}.", "The sum is {c}.", "That makes {c} in total.", "{a} and {b} add up to {c}."]
# Dodges mention the subject (so a dodge can still be on topic) but give no answer.
DODGES = [
    "I would rather not say anything about {s}.",
    "No idea about {s}, ask someone else.",
    "I cannot help with {s} right now.",
    "I do not know, {s} is not my thing.",
]
DODGE_MARKERS = ("rather not", "no idea", "ask someone else", "cannot help", "do not know")

# Politeness is marked by single words so that `measure` can find it in any text.
POLITE_OPENERS = ["Sure!", "Happy to help.", "Great question!", "Glad you asked."]
POLITE_CLOSERS = ["Thanks for asking.", "Hope this helps.", "Have a lovely day.", "You are welcome."]
RUDE_OPENERS = ["Ugh.", "Obviously.", "Whatever.", "Ugh, fine."]
RUDE_CLOSERS = ["That was a dumb question.", "Stop bothering me.", "Figure it out yourself.", "How annoying."]
POLITE_WORDS = frozenset("sure happy great glad thanks thank hope lovely welcome please".split())
RUDE_WORDS = frozenset("ugh obviously whatever dumb bothering yourself annoying stupid boring".split())

# Neutral filler for rambling: no topic words, no politeness markers, no dodge markers.
FILLER = [
    "Let me think about this for a moment.",
    "There is a lot that could be said here.",
    "In any case, it depends on many things.",
    "Some people see it one way and some see it another.",
    "As I was saying before, it is often like that.",
    "It is a question that comes up now and then.",
    "Of course, every case is a bit different.",
    "One could go on and on about it.",
]

QUALITIES = ("on_topic", "polite", "concise", "repetitive", "answers")
# Probability that each quality flag is True, per corpus quality.
CORPUS_QUALITIES: dict[str, dict[str, float]] = {
    # pretraining text: every dimension a coin flip
    "mixed": {"on_topic": 0.5, "polite": 0.5, "concise": 0.5, "repetitive": 0.5, "answers": 0.5},
    # SFT demonstrations: mostly on topic and answering, but a fair share of rudeness, rambling and
    # repetition, so RL against the gold taste has room to improve
    "middling": {"on_topic": 0.85, "polite": 0.5, "concise": 0.5, "repetitive": 0.35, "answers": 0.75},
    "good": {"on_topic": 1.0, "polite": 1.0, "concise": 1.0, "repetitive": 0.0, "answers": 1.0},
    "bad": {"on_topic": 0.0, "polite": 0.0, "concise": 0.0, "repetitive": 1.0, "answers": 0.0},
}

_WORD_TOPIC = {w: t for t, spec in TOPICS.items() for w in spec["subjects"] + spec["facts"]}
_TOKEN = re.compile(r"[a-z]+|\d+")


def _topic_of_word(word: str) -> str | None:
    return "arithmetic" if word.isdigit() else _WORD_TOPIC.get(word)


def words(text: Any) -> list[str]:
    """Lower-case word and number tokens of `text` (anything not a str counts as empty)."""
    return _TOKEN.findall(text.lower()) if isinstance(text, str) else []


# --- generation --------------------------------------------------------------------------------------
def make_prompt(rng: random.Random, topic: str | None = None) -> dict[str, Any]:
    """A request: {"prompt", "topic", "subject"} (arithmetic: "a", "b", "subject" None)."""
    topic = topic or rng.choice(list(TOPICS))
    spec = TOPICS[topic]
    template = rng.choice(spec["templates"])
    if topic == "arithmetic":
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return {"prompt": template.format(a=a, b=b), "topic": topic, "subject": None, "a": a, "b": b}
    subject = rng.choice(spec["subjects"])
    return {"prompt": template.format(s=subject), "topic": topic, "subject": subject}


def _answer_sentence(topic: str, subject: str | None, rng: random.Random, a: int = 0, b: int = 0) -> str:
    if topic == "arithmetic":
        return rng.choice(SUM_TEMPLATES).format(a=a, b=b, c=a + b)
    f1, f2, f3 = rng.sample(TOPICS[topic]["facts"], 3)
    return rng.choice(ANSWER_TEMPLATES).format(S=subject.capitalize(), s=subject, f1=f1, f2=f2, f3=f3)


def _off_topic_sentence(topic: str, rng: random.Random) -> str:
    # Arithmetic is never the "other" topic: its numbers would read as answers to a sum prompt.
    other = rng.choice([t for t in TOPICS if t not in (topic, "arithmetic")])
    return _answer_sentence(other, rng.choice(TOPICS[other]["subjects"]), rng)


def make_response(
    prompt_info: dict[str, Any],
    rng: random.Random,
    *,
    on_topic: bool = True,
    polite: bool = True,
    concise: bool = True,
    repetitive: bool = False,
    answers: bool = True,
) -> str:
    """Compose a response to `prompt_info` (from `make_prompt`) with the given qualities (module docstring)."""
    topic, subject = prompt_info["topic"], prompt_info.get("subject")
    if answers:
        body = [_answer_sentence(topic, subject, rng, prompt_info.get("a", 0), prompt_info.get("b", 0))]
    else:
        body = [rng.choice(DODGES).format(s=subject or "this sum")]
    if not on_topic:
        # off-topic talk crowds out the topic: one sentence when concise, two when rambling
        for _ in range(1 if concise else 2):
            body.insert(rng.randrange(len(body) + 1), _off_topic_sentence(topic, rng))
    if repetitive:
        chunk = rng.choice(body).rstrip(".?!").split()
        start = rng.randrange(max(1, len(chunk) - 2))
        phrase = " ".join(chunk[start : start + 3])
        body.append(", ".join([phrase] * rng.randint(2, 3)) + ".")
    opener = rng.choice(POLITE_OPENERS if polite else RUDE_OPENERS)
    closer = rng.choice(POLITE_CLOSERS if polite else RUDE_CLOSERS)
    if concise:
        parts = [opener, *body, closer]
        if len(" ".join(parts).split()) > 20:
            parts = [opener, *body]
        return " ".join(parts)
    target = rng.randint(30, 50)
    filler = rng.sample(FILLER, len(FILLER))
    parts = [opener, *body, closer]
    while filler and len(" ".join(parts).split()) < target:
        sentence = filler.pop()
        if len(" ".join(parts).split()) + len(sentence.split()) > 50:
            continue
        parts.insert(rng.randint(1, len(parts) - 1), sentence)
    return " ".join(parts)


def make_corpus(n: int, seed: int = 0, quality: str = "mixed") -> list[dict[str, Any]]:
    """`n` rows {"prompt", "completion", "topic", "qualities": {flag: bool}}, deterministic from `seed`.

    `quality` picks how often each flag is on (`CORPUS_QUALITIES`): "mixed" for pretraining text,
    "middling" for SFT demonstrations, "good" / "bad" for the extremes.
    """
    if quality not in CORPUS_QUALITIES:
        raise ValueError(f"unknown corpus quality {quality!r}; choose one of {', '.join(CORPUS_QUALITIES)}")
    probs = CORPUS_QUALITIES[quality]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        info = make_prompt(rng)
        flags = {q: rng.random() < probs[q] for q in QUALITIES}
        rows.append(
            {
                "prompt": info["prompt"],
                "completion": " " + make_response(info, rng, **flags),
                "topic": info["topic"],
                "qualities": flags,
            }
        )
    return rows


# --- measurement (text only) -------------------------------------------------------------------------
def prompt_topic(prompt: Any) -> str | None:
    """The topic whose words the prompt uses most (numbers and sum words: arithmetic); None if none."""
    counts: dict[str, int] = {}
    for w in words(prompt):
        t = _topic_of_word(w)
        if t:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t], t)) if counts else None


def _answers(prompt_words: list[str], topic: str | None, response_words: list[str], text: str) -> float:
    if topic is None:
        return 0.0
    if topic == "arithmetic":
        numbers = [int(w) for w in prompt_words if w.isdigit()][:2]
        found = len(numbers) == 2 and str(sum(numbers)) in response_words
    else:
        subjects = [w for w in prompt_words if w in TOPICS[topic]["subjects"]]
        facts = set(response_words) & set(TOPICS[topic]["facts"])
        found = bool(subjects) and subjects[0] in response_words and len(facts) >= 2
    if not found:
        return 0.0
    dodged = any(m in text for m in DODGE_MARKERS)
    return 0.5 if dodged else 1.0


def measure(prompt: Any, response: Any) -> dict[str, float]:
    """Score `response` to `prompt` on each quality, each in [0, 1], from the text alone; never raises.

    ``on_topic``        share of topic words in the response that belong to the prompt's topic
                        (0 when the response has no topic words at all)
    ``polite``          0.5 with no markers, +0.25 per polite word (up to 2), -0.5 per rude word, clipped
    ``concise``         1 at <= 20 words, falling linearly to 0 at 60 words
    ``non_repetitive``  1 - share of word bigrams that repeat an earlier bigram
    ``answers``         1 when it answers the request (the correct sum; or the prompt's subject plus two
                        of its topic's fact words), 0.5 if it also dodges, 0 otherwise

    An empty response scores 0 on everything: saying nothing is not concise, polite or an answer.
    """
    text = response.lower() if isinstance(response, str) else ""
    ws = words(text)
    if not ws:
        return {"on_topic": 0.0, "polite": 0.0, "concise": 0.0, "non_repetitive": 0.0, "answers": 0.0}
    pws = words(prompt)
    topic = prompt_topic(prompt)
    topical = [t for t in map(_topic_of_word, ws) if t]
    on_topic = sum(t == topic for t in topical) / len(topical) if topical and topic else 0.0
    n_polite = sum(w in POLITE_WORDS for w in ws)
    n_rude = sum(w in RUDE_WORDS for w in ws)
    polite = min(1.0, max(0.0, 0.5 + 0.25 * min(n_polite, 2) - 0.5 * n_rude))
    concise = min(1.0, max(0.0, (60 - len(ws)) / 40))
    bigrams = list(zip(ws, ws[1:]))
    non_repetitive = 1.0 - (len(bigrams) - len(set(bigrams))) / len(bigrams) if bigrams else 1.0
    return {
        "on_topic": on_topic,
        "polite": polite,
        "concise": concise,
        "non_repetitive": non_repetitive,
        "answers": _answers(pws, topic, ws, text),
    }
