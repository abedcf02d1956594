"""Demo-model benchmark: does the model know the demo world? Before (random weights,
``make_tiny_siglip``) and after (the trained model shipped in saefe/demo/model), on a held-out
demo corpus (generator seed 1 by default: neither the demo's seed 0 nor training's 10_000+).

For each model the whole demo build runs on the held-out corpus (``build_demo``: corpus, index,
SAE at the demo's size, label profiles), timed, and then:

  * text->image precision@20 for single-attribute prompts (one per emotion, gender, age group)
    and compound prompts (emotion + gender + age, every combination with >= 20 images), phrased
    like the training captions and, separately, with HELD_OUT phrasings no training template uses;
  * zero-shot emotion accuracy (one prompt per emotion: DEMO_TEXT_PROMPTS);
  * linear-probe accuracy (logistic regression, 1/3 held out) for emotion, gender, age;
  * the number of dimensions holding 99% of the embedding variance;
  * the demo SAE's dead fraction (its validation report) and label-search precision@20 per emotion.

    SAEFE_HOME=/tmp/saefe_home python benchmarks/bench_demo_model.py [--n 3000] [--seed 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from procstat import table  # noqa: E402

from saefe.demo.captions import EMOTION_ADJECTIVES, PERSON_NOUNS, TEMPLATES, article  # noqa: E402
from saefe.demo.corpus import DEMO_AGES, DEMO_EMOTIONS, DEMO_GENDERS, DEMO_TEXT_PROMPTS  # noqa: E402
from saefe.demo.quality import (  # noqa: E402
    compound_prompts, dims_for_variance, precision_at_k, probe_accuracy, prompt, single_prompts, zero_shot_accuracy,
)

# Phrasings no training template uses (asserted below), with synonyms from the caption words.
HELD_OUT_SINGLE = [
    ("someone who looks really happy", "Happiness"), ("cheerful looking individual", "Happiness"),
    ("somebody crying", "Sadness"), ("a person that seems very gloomy", "Sadness"),
    ("someone who is furious", "Anger"), ("mad looking somebody", "Anger"),
    ("a terrified individual", "Fear"), ("somebody who seems afraid", "Fear"),
    ("someone looking shocked", "Surprise"), ("an astonished looking person", "Surprise"),
    ("a relaxed and serene person", "Peace"), ("somebody at peace", "Peace"),
    ("someone who feels proud", "Esteem"), ("a confident looking individual", "Esteem"),
    ("somebody thrilled", "Excitement"), ("an ecstatic looking person", "Excitement"),
]
HELD_OUT_PERSON = [
    ("picture with a male in it", "Male", None), ("just a male person", "Male", None),
    ("picture with a female in it", "Female", None), ("just a female person", "Female", None),
    ("the kid", None, "Kid"), ("picture with a little child in it", None, "Kid"),
    ("the teen", None, "Teenager"), ("picture with an adolescent in it", None, "Teenager"),
    ("the grownup", None, "Adult"), ("picture with an adult person in it", None, "Adult"),
]
HELD_OUT_COMPOUND_TEMPLATES = [
    "{noun} who looks {adj}", "{adj} looking {noun}", "show me {a} {adj} {noun}", "the {noun} is {adj}",
    "{noun} that seems really {adj}", "{noun} feeling very {adj}",
]


def held_out_prompts(labels) -> tuple[list, list]:
    single = [prompt(t, emotion=e) for t, e in HELD_OUT_SINGLE]
    single += [prompt(t, gender=g, age=a) for t, g, a in HELD_OUT_PERSON]
    emotion, gender, age = labels
    compound, k = [], 0
    for ei, e in enumerate(DEMO_EMOTIONS):
        for gi, g in enumerate(DEMO_GENDERS):
            for ai, a in enumerate(DEMO_AGES):
                if int(((emotion == ei) & (gender == gi) & (age == ai)).sum()) < 20:
                    continue
                adj = EMOTION_ADJECTIVES[e][1 + k % (len(EMOTION_ADJECTIVES[e]) - 1)]  # a synonym
                noun = PERSON_NOUNS[(g, a)][k % len(PERSON_NOUNS[(g, a)])]
                tpl = HELD_OUT_COMPOUND_TEMPLATES[k % len(HELD_OUT_COMPOUND_TEMPLATES)]
                compound.append(prompt(tpl.format(a=article(adj), adj=adj, noun=noun), e, g, a))
                k += 1
    return single, compound


def _shape(text: str) -> str:
    return text.replace("{a}", "a")


def check_held_out() -> None:
    """No held-out phrasing may be a training template (up to the article)."""
    train = {_shape(t) for t in TEMPLATES}
    for tpl in HELD_OUT_COMPOUND_TEMPLATES:
        assert _shape(tpl) not in train, tpl


def measure(model: str, out: Path, n: int, seed: int) -> dict:
    import pandas as pd

    from saefe.demo.pipeline import DemoBuildConfig, build_demo
    from saefe.ingest.build import BuildConfig
    from saefe.manifest import read_json
    from saefe.search.engine import Engine, Term

    t0 = time.time()
    build_demo(DemoBuildConfig(build=BuildConfig(out=str(out / "index"), model=model, progress=False),
                               n=n, seed=seed, sae_out=str(out / "sae")))
    build_s = time.time() - t0
    eng = Engine.open(out / "index", sae_dir=out / "sae", model=model)
    x = eng.store.vectors_f32()
    ann = pd.read_csv(out / "index" / "demo" / "annotations.csv")
    order = {name: i for i, name in enumerate(ann.Filename)}
    rows = np.array([order[Path(p).name] for p in eng.store.metadata["path"]])
    emotion = ann[DEMO_EMOTIONS].to_numpy().argmax(1)[rows]
    gender = np.array([DEMO_GENDERS.index(g) for g in ann.Gender])[rows]
    age = np.array([DEMO_AGES.index(a) for a in ann.Age])[rows]
    labels = (emotion, gender, age)
    enc = eng.encoder

    def p_at_20(prompts):
        return precision_at_k(enc.embed_texts([p.text for p in prompts]), x, prompts, labels)

    ho_single, ho_compound = held_out_prompts(labels)
    res = {
        "build_s": build_s,
        "single": p_at_20(single_prompts()).mean(),
        "compound": p_at_20(compound_prompts(labels)).mean(),
        "n_compound": len(compound_prompts(labels)),
        "held_out_single": p_at_20(ho_single).mean(),
        "held_out_compound": p_at_20(ho_compound).mean(),
        "zero_shot": zero_shot_accuracy(enc.embed_texts([DEMO_TEXT_PROMPTS[e] for e in DEMO_EMOTIONS]), x, emotion),
        "probe_emotion": probe_accuracy(x, emotion),
        "probe_gender": probe_accuracy(x, gender),
        "probe_age": probe_accuracy(x, age),
        "dims99": dims_for_variance(x),
        "dead": read_json(out / "sae" / "report.json")["validation"]["dead_fraction"],
        "d_hidden": eng.sae.config.d_hidden,
    }
    attrs = eng.attributes
    for e in DEMO_EMOTIONS:
        truth = attrs[e].to_numpy().astype(bool)
        ids = [r.id for r in eng.search([Term("label", e)], k=20)]
        res[f"label:{e}"] = float(truth[ids].mean())
    res["worst_held_out_compound"] = sorted(
        zip(p_at_20(ho_compound), [p.text for p in ho_compound]))[:3]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="held-out corpus size (the demo's size)")
    ap.add_argument("--seed", type=int, default=1, help="held-out demo generator seed")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--skip-before", action="store_true", help="only the trained model")
    args = ap.parse_args()
    check_held_out()
    import torch

    from saefe.demo.tiny_model import make_tiny_siglip

    torch.set_num_threads(2)
    root = Path(args.out or tempfile.mkdtemp(prefix="bench_demo_model_"))
    runs = {}
    if not args.skip_before:
        rand = make_tiny_siglip(root / "random_model")
        runs["before (random)"] = measure(str(rand), root / "before", args.n, args.seed)
    runs["after (trained)"] = measure("demo", root / "after", args.n, args.seed)

    names = list(runs)
    rows = [
        ["text P@20, single attribute (13 prompts)", ">= 0.9", *[f"{r['single']:.3f}" for r in runs.values()]],
        [f"text P@20, compound ({runs[names[-1]]['n_compound']} prompts)", ">= 0.8", *[f"{r['compound']:.3f}" for r in runs.values()]],
        [f"held-out phrasing P@20, single ({len(HELD_OUT_SINGLE) + len(HELD_OUT_PERSON)})", ">= 0.9",
         *[f"{r['held_out_single']:.3f}" for r in runs.values()]],
        ["held-out phrasing P@20, compound", ">= 0.8", *[f"{r['held_out_compound']:.3f}" for r in runs.values()]],
        ["zero-shot emotion accuracy", ">= 0.85", *[f"{r['zero_shot']:.3f}" for r in runs.values()]],
        ["linear probe: emotion", "", *[f"{r['probe_emotion']:.3f}" for r in runs.values()]],
        ["linear probe: gender", "", *[f"{r['probe_gender']:.3f}" for r in runs.values()]],
        ["linear probe: age", "", *[f"{r['probe_age']:.3f}" for r in runs.values()]],
        ["dims holding 99% of the variance", ">= 48", *[f"{r['dims99']}" for r in runs.values()]],
        ["demo SAE dead fraction", "<= 0.25", *[f"{r['dead']:.3f} (of {r['d_hidden']})" for r in runs.values()]],
        *[[f"label search P@20: {e}", ">= 0.95", *[f"{r[f'label:{e}']:.2f}" for r in runs.values()]] for e in DEMO_EMOTIONS],
        ["demo build (corpus, index, SAE, labels), s", "~90", *[f"{r['build_s']:.1f}" for r in runs.values()]],
    ]
    print(f"\n## demo model, held-out demo corpus (seed {args.seed}, {args.n} images), {os.cpu_count()} CPUs\n")
    print(table(rows, ["metric", "target", *names]))
    for name, r in runs.items():
        print(f"\n{name}: worst held-out compound prompts: " +
              "; ".join(f"{t!r} {p:.2f}" for p, t in r["worst_held_out_compound"]))


if __name__ == "__main__":
    main()
