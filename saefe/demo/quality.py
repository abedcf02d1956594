"""How well a model knows the demo world, measured on images whose planted truth is known.

Shared by the training record (``train_model``) and ``benchmarks/bench_demo_model.py`` so both
report the same numbers the same way. All inputs are L2-normalised embeddings and label indices
(into DEMO_EMOTIONS / DEMO_GENDERS / DEMO_AGES).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from saefe.demo.captions import Mention
from saefe.demo.corpus import DEMO_AGES, DEMO_EMOTIONS, DEMO_GENDERS


@dataclass(frozen=True)
class Prompt:
    text: str
    mention: Mention


def prompt(text: str, emotion: str | None = None, gender: str | None = None, age: str | None = None) -> Prompt:
    return Prompt(text, Mention(DEMO_EMOTIONS.index(emotion) if emotion else -1,
                                DEMO_GENDERS.index(gender) if gender else -1,
                                DEMO_AGES.index(age) if age else -1))


def precision_at_k(text_emb: np.ndarray, image_emb: np.ndarray, prompts: list[Prompt], labels, k: int = 20) -> np.ndarray:
    """Per prompt: the share of its top-k images (by cosine) that fit every attribute it states."""
    emotion, gender, age = labels
    scores = np.asarray(text_emb, np.float32) @ np.asarray(image_emb, np.float32).T
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.empty(len(prompts))
    for i, p in enumerate(prompts):
        ok = p.mention.matches(emotion, gender, age)
        out[i] = ok[top[i]].mean()
    return out


def zero_shot_accuracy(class_emb: np.ndarray, image_emb: np.ndarray, truth: np.ndarray) -> float:
    """Accuracy of labelling each image with its most similar class prompt."""
    pred = np.argmax(np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T, axis=1)
    return float((pred == np.asarray(truth)).mean())


def dims_for_variance(x: np.ndarray, share: float = 0.99) -> int:
    """How many principal directions hold ``share`` of the variance of ``x`` (rows = samples)."""
    x = np.asarray(x, np.float64)
    s = np.linalg.svd(x - x.mean(0), compute_uv=False) ** 2
    c = np.cumsum(s) / s.sum()
    return int(np.searchsorted(c, share) + 1)


def probe_accuracy(x: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy of a logistic regression on standardised embeddings (1/3 held out)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, np.float32)
    test = np.random.default_rng(seed).permutation(len(x)) < len(x) // 3
    scaler = StandardScaler().fit(x[~test])
    clf = LogisticRegression(C=1.0, max_iter=3000).fit(scaler.transform(x[~test]), y[~test])
    return float(clf.score(scaler.transform(x[test]), y[test]))


def compound_prompts(labels, template: str = "a photo of {a} {adj} {noun}", min_count: int = 20) -> list[Prompt]:
    """One emotion + gender + age prompt per combination with at least ``min_count`` images,
    phrased with the first adjective and noun of captions.py."""
    from saefe.demo.captions import EMOTION_ADJECTIVES, PERSON_NOUNS, article

    emotion, gender, age = labels
    out = []
    for ei, e in enumerate(DEMO_EMOTIONS):
        for gi, g in enumerate(DEMO_GENDERS):
            for ai, a in enumerate(DEMO_AGES):
                n = int(((emotion == ei) & (gender == gi) & (age == ai)).sum())
                if n < min_count:
                    continue
                adj, noun = EMOTION_ADJECTIVES[e][0], PERSON_NOUNS[(g, a)][0]
                out.append(prompt(template.format(a=article(adj), adj=adj, noun=noun), e, g, a))
    return out


def single_prompts(template_emotion: str = "a photo of {a} {adj} person", template_person: str = "a photo of {a} {noun}") -> list[Prompt]:
    """One prompt per emotion, gender and age group (captions.py's first words)."""
    from saefe.demo.captions import EMOTION_ADJECTIVES, PERSON_NOUNS, article

    out = []
    for e in DEMO_EMOTIONS:
        adj = EMOTION_ADJECTIVES[e][0]
        out.append(prompt(template_emotion.format(a=article(adj), adj=adj), e))
    for g in DEMO_GENDERS:
        noun = PERSON_NOUNS[(g, None)][1]
        out.append(prompt(template_person.format(a=article(noun), noun=noun), gender=g))
    for a in DEMO_AGES:
        noun = PERSON_NOUNS[(None, a)][0]
        out.append(prompt(template_person.format(a=article(noun), noun=noun), age=a))
    return out
