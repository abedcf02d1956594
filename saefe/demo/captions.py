"""Captions for demo images, written from each image's planted truth (emotion, gender, age).

The demo model's text tower learns the demo's world from these alone, so they must cover the
ways a person would ask for a picture: emotion adjectives and their synonyms ("happy",
"cheerful"), emotion nouns ("joy", "a person feeling happiness"), gender and age nouns ("boy",
"teenage girl", "man", "adult"), several sentence templates, and *partial* captions that mention
only some attributes ("a man", "a happy person", "a child"). A caption is paired with every image
that matches all the attributes it mentions (``Mention.matches``), not only with the image it was
written for, so "a man" learns to sit near every adult male and nothing else.

Words a caption may use are fixed here; the benchmark keeps its own held-out phrasings
(benchmarks/bench_demo_model.py) that never appear in ``TEMPLATES``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

import numpy as np

from saefe.demo.corpus import DEMO_AGES, DEMO_EMOTIONS, DEMO_GENDERS

# Emotion adjectives (fit "a {adj} boy" and "a boy who is {adj}").
EMOTION_ADJECTIVES: dict[str, list[str]] = {
    "Happiness": ["happy", "joyful", "cheerful", "smiling", "glad", "delighted", "merry"],
    "Sadness": ["sad", "unhappy", "crying", "tearful", "gloomy", "sorrowful", "miserable", "depressed"],
    "Anger": ["angry", "furious", "mad", "enraged", "irate", "raging", "livid"],
    "Fear": ["scared", "afraid", "frightened", "terrified", "fearful", "panicked", "horrified"],
    "Surprise": ["surprised", "astonished", "amazed", "shocked", "startled", "stunned", "astounded"],
    "Peace": ["calm", "peaceful", "serene", "relaxed", "tranquil", "content", "placid"],
    "Esteem": ["proud", "confident", "dignified", "triumphant", "assured", "victorious", "respected"],
    "Excitement": ["excited", "thrilled", "ecstatic", "enthusiastic", "energetic", "exhilarated", "elated"],
}
# Emotion nouns (fit "a boy feeling {noun}", "full of {noun}"); the label name comes first.
EMOTION_NOUNS: dict[str, list[str]] = {
    "Happiness": ["happiness", "joy", "cheer", "delight", "gladness"],
    "Sadness": ["sadness", "sorrow", "grief", "misery", "unhappiness"],
    "Anger": ["anger", "rage", "fury", "wrath"],
    "Fear": ["fear", "terror", "fright", "panic", "dread"],
    "Surprise": ["surprise", "astonishment", "amazement", "shock", "wonder"],
    "Peace": ["peace", "calm", "serenity", "tranquility", "contentment"],
    "Esteem": ["esteem", "pride", "confidence", "dignity", "triumph"],
    "Excitement": ["excitement", "thrill", "enthusiasm", "exhilaration", "elation"],
}
# Person nouns by (gender, age); None = not mentioned.
PERSON_NOUNS: dict[tuple[str | None, str | None], list[str]] = {
    ("Male", "Kid"): ["boy", "little boy", "young boy", "schoolboy", "male child", "male kid"],
    ("Female", "Kid"): ["girl", "little girl", "young girl", "schoolgirl", "female child", "female kid"],
    ("Male", "Teenager"): ["teenage boy", "teen boy", "adolescent boy", "male teenager", "male teen"],
    ("Female", "Teenager"): ["teenage girl", "teen girl", "adolescent girl", "female teenager", "female teen"],
    ("Male", "Adult"): ["man", "adult man", "grown man", "gentleman", "male adult", "old man", "older man", "guy"],
    ("Female", "Adult"): ["woman", "adult woman", "grown woman", "lady", "female adult", "old woman", "older woman"],
    (None, "Kid"): ["child", "kid", "little kid", "young child", "little child"],
    (None, "Teenager"): ["teenager", "teen", "adolescent", "youth", "teenage person"],
    (None, "Adult"): ["adult", "grownup", "adult person", "grown person", "old person", "older person"],
    ("Male", None): ["male", "male person", "male figure", "male character"],
    ("Female", None): ["female", "female person", "female figure", "female character"],
    (None, None): ["person", "someone", "somebody", "individual", "figure", "character"],
}
# Sentence templates. {a}: "a"/"an" for the word after it; {adj}, {enoun}, {noun} as above.
TEMPLATES_WITH_EMOTION: list[str] = [
    "{a} {adj} {noun}",
    "a photo of {a} {adj} {noun}",
    "a picture of {a} {adj} {noun}",
    "an image of {a} {adj} {noun}",
    "{adj} {noun}",
    "{a} {noun} who is {adj}",
    "{a} {noun} looking {adj}",
    "a photo of {a} {noun} looking {adj}",
    "{a} {noun}, {adj}",
    "{a} {noun} feeling {enoun}",
    "a photo of {a} {noun} feeling {enoun}",
    "{a} {noun} full of {enoun}",
    "{a} {noun} showing {enoun}",
    "a drawing of {a} {adj} {noun}",
    "a very {adj} {noun}",
]
TEMPLATES_EMOTION_ONLY: list[str] = ["{enoun}", "a photo of {enoun}", "a picture showing {enoun}", "{adj}"]
TEMPLATES_NO_EMOTION: list[str] = [
    "{a} {noun}", "a photo of {a} {noun}", "a picture of {a} {noun}", "an image of {a} {noun}",
    "{noun}", "a drawing of {a} {noun}",
]
TEMPLATES: list[str] = TEMPLATES_WITH_EMOTION + TEMPLATES_EMOTION_ONLY + TEMPLATES_NO_EMOTION

# Which attributes a caption mentions: (emotion, gender, age) flags and their sampling weights.
MENTION_WEIGHTS: dict[tuple[bool, bool, bool], float] = {
    (True, True, True): 0.40,
    (True, False, False): 0.14,
    (True, True, False): 0.09,
    (True, False, True): 0.09,
    (False, True, True): 0.12,
    (False, True, False): 0.06,
    (False, False, True): 0.06,
    (False, False, False): 0.04,
}


@dataclass(frozen=True)
class Mention:
    """The attributes a caption states, as indices into DEMO_EMOTIONS/GENDERS/AGES (-1: not said)."""

    emotion: int = -1
    gender: int = -1
    age: int = -1

    def matches(self, emotion: np.ndarray, gender: np.ndarray, age: np.ndarray) -> np.ndarray:
        """Boolean mask of the images (given by their label indices) that fit every stated attribute."""
        ok = np.ones(np.shape(emotion), dtype=bool)
        for said, truth in ((self.emotion, emotion), (self.gender, gender), (self.age, age)):
            if said >= 0:
                ok &= np.asarray(truth) == said
        return ok

    @property
    def n_attributes(self) -> int:
        return int(self.emotion >= 0) + int(self.gender >= 0) + int(self.age >= 0)


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def render_caption(template: str, emotion: str | None, gender: str | None, age: str | None,
                   rng: np.random.Generator) -> str:
    """Fill ``template`` for the stated attributes, choosing synonyms with ``rng``."""
    adj = _pick(rng, EMOTION_ADJECTIVES[emotion]) if emotion else ""
    enoun = _pick(rng, EMOTION_NOUNS[emotion]) if emotion else ""
    noun = _pick(rng, PERSON_NOUNS[(gender, age)])
    # {a} agrees with the word that follows it in this template.
    after = template.split("{a}", 1)[1].lstrip() if "{a}" in template else ""
    nxt = adj if after.startswith("{adj}") else noun
    text = template.format(a=article(nxt), adj=adj, enoun=enoun, noun=noun)
    return " ".join(text.split())


def caption_for(emotion: str, gender: str, age: str, rng: np.random.Generator,
                mention: tuple[bool, bool, bool] | None = None) -> tuple[str, Mention]:
    """One caption for an image with these labels; ``mention`` forces which attributes it states."""
    if mention is None:
        keys = list(MENTION_WEIGHTS)
        p = np.array([MENTION_WEIGHTS[k] for k in keys])
        mention = keys[int(rng.choice(len(keys), p=p / p.sum()))]
    say_e, say_g, say_a = mention
    e = emotion if say_e else None
    g = gender if say_g else None
    a = age if say_a else None
    if e and not g and not a and rng.random() < 0.3:
        template = _pick(rng, TEMPLATES_EMOTION_ONLY)
    elif e:
        template = _pick(rng, TEMPLATES_WITH_EMOTION)
    else:
        template = _pick(rng, TEMPLATES_NO_EMOTION)
    text = render_caption(template, e, g, a, rng)
    return text, Mention(
        DEMO_EMOTIONS.index(e) if e else -1, DEMO_GENDERS.index(g) if g else -1, DEMO_AGES.index(a) if a else -1
    )


# Words that say nothing about the attributes, sprinkled into some captions.
FILLER_WORDS = ["very", "really", "quite", "here", "standing", "cartoon", "outside", "in", "the", "scene", "looking"]


def add_noise(text: str, rng: np.random.Generator, p: float = 0.3) -> str:
    """With probability ``p`` insert a filler word or a random letter string at a random place,
    so that words a user types but no caption uses (tokenised into pieces the captions never
    produce) do not throw the text tower off."""
    if rng.random() >= p:
        return text
    words = text.split()
    if rng.random() < 0.5:
        extra = _pick(rng, FILLER_WORDS)
    else:
        extra = "".join(chr(97 + int(c)) for c in rng.integers(26, size=int(rng.integers(3, 9))))
    words.insert(int(rng.integers(len(words) + 1)), extra)
    return " ".join(words)


def captions_for_labels(emotions: np.ndarray, genders: np.ndarray, ages: np.ndarray,
                        rng: np.random.Generator, noise: float = 0.0) -> tuple[list[str], np.ndarray]:
    """One caption per image (label indices in); returns texts and an (n, 3) array of mentions.
    ``noise``: the share of captions given an uninformative extra word (``add_noise``)."""
    texts, mentions = [], np.empty((len(emotions), 3), dtype=np.int64)
    for i, (e, g, a) in enumerate(zip(emotions, genders, ages)):
        t, m = caption_for(DEMO_EMOTIONS[int(e)], DEMO_GENDERS[int(g)], DEMO_AGES[int(a)], rng)
        texts.append(add_noise(t, rng, noise) if noise > 0 else t)
        mentions[i] = (m.emotion, m.gender, m.age)
    return texts, mentions


def positives(mentions: np.ndarray, emotions: np.ndarray, genders: np.ndarray, ages: np.ndarray) -> np.ndarray:
    """(n_captions, n_images) boolean: image j fits every attribute caption i states."""
    ok = np.ones((len(mentions), len(emotions)), dtype=bool)
    for col, truth in enumerate((emotions, genders, ages)):
        said = mentions[:, col][:, None]
        ok &= (said < 0) | (said == np.asarray(truth)[None, :])
    return ok


def vocabulary_text() -> list[str]:
    """Every sentence shape the captions use, each word at least once (the tokenizer's corpus)."""
    rng = np.random.default_rng(0)
    lines: list[str] = []
    for template in TEMPLATES:
        for e in [None, *DEMO_EMOTIONS]:
            if ("{adj}" in template or "{enoun}" in template) and e is None:
                continue
            for (g, a) in PERSON_NOUNS:
                if "{noun}" not in template and (g or a):
                    continue
                for _ in range(3):
                    lines.append(render_caption(template, e, g, a, rng))
    words = {w for lst in (*EMOTION_ADJECTIVES.values(), *EMOTION_NOUNS.values(), *PERSON_NOUNS.values(),
                           FILLER_WORDS) for phrase in lst for w in phrase.split()}
    # Each word alone, repeated, so that the tokenizer keeps every caption word as one piece.
    lines += [w for w in sorted(words) for _ in range(20)]
    # As SiglipTokenizer sees them: lower case, punctuation removed.
    strip = str.maketrans("", "", string.punctuation)
    return [" ".join(line.lower().translate(strip).split()) for line in lines]
