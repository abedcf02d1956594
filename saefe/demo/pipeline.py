"""The built-in offline demo, end to end: generate the corpus, embed it with the demo model
(the tiny SigLIP trained on the demo world, saefe/demo/model), then train its SAE, store its
codes and profile its labels.

So that ``python scripts/build_index.py`` alone leaves everything the app needs. The demo sits on
top of the stages and calls them; no stage imports it. Each step is skipped when its output is
already there (a re-run is cheap and resumes an interrupted one); an SAE trained on other
embeddings than the index now holds is retrained, and a demo index embedded with the retired
random-weight model is rebuilt (it is generated data: nothing of the user's is lost).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from saefe.labels.attributes import set_default_sae, write_attributes
from saefe.manifest import read_json
from saefe.ingest.build import BuildConfig, BuildSummary, build_index
from saefe.ingest.store import EmbeddingStore, read_manifest, set_manifest_setting

log = logging.getLogger(__name__)

DEMO_INDEX = "index/demo"
DEMO_SAE = "weights/demo"
# The demo SAE for the demo model's 128-d embeddings of 3000 images. Swept on a held-out demo
# index (validation dead fraction / FVU): 512/16 0.59/0.057, 512/16+AuxK 0.46/0.056, 256/16+AuxK
# 0.31/0.056, 256/32 0.19/0.042, 256/32+AuxK 0.16/0.042, 128/16+AuxK 0.08/0.061; see
# benchmarks/bench_demo_model.py for the shipped model's numbers.
DEMO_SAE_D_HIDDEN = 256
DEMO_SAE_K = 32
DEMO_SAE_AUXK = True
DEMO_DEDUP_THRESHOLD = 0.9995


@dataclass(frozen=True)
class DemoBuildConfig:
    """The demo's knobs; ``build`` carries the stage's own config (out dir, model, index...)."""

    build: BuildConfig = field(default_factory=lambda: BuildConfig(out=DEMO_INDEX))
    n: int = 3000
    seed: int = 0
    sae_out: str = DEMO_SAE
    with_sae: bool = True
    sae_d_hidden: int = DEMO_SAE_D_HIDDEN
    sae_k: int = DEMO_SAE_K
    sae_auxk: bool = DEMO_SAE_AUXK


def build_demo(cfg: DemoBuildConfig) -> BuildSummary:
    """Generate the demo corpus, build its index, then its SAE, codes and label profiles."""
    from saefe.demo.corpus import DemoConfig, generate_demo

    out = Path(cfg.build.out)
    corpus = generate_demo(out / "demo", DemoConfig(n=cfg.n, seed=cfg.seed), progress=cfg.build.progress)
    print(f"demo images: {corpus.images_dir}\ndemo annotations: {corpus.annotations}", flush=True)
    build = replace(cfg.build, images=str(corpus.images_dir))
    if _legacy_demo_index(out, corpus.images_dir):
        print(f"{out} was embedded with the retired random-weight demo model; rebuilding it", flush=True)
        build = replace(build, force=True)
    summary = build_index(build)
    # A tiny model puts some different pictures above cosine 0.99 (real SigLIP keeps that for
    # near-copies; the trained demo model: 8 of 3000 images, the old random one: many), so only
    # exact copies count as near-duplicates in the demo.
    if "dedup_threshold" not in (read_manifest(out) or {}):
        set_manifest_setting(out, "dedup_threshold", DEMO_DEDUP_THRESHOLD)
    summary.extras["demo images"] = str(corpus.images_dir)
    summary.extras["demo annotations"] = str(corpus.annotations)
    if cfg.with_sae:
        summary.extras.update(demo_sae_and_labels(
            out, Path(cfg.sae_out), corpus.annotations, cfg.build.progress, d_hidden=cfg.sae_d_hidden, k=cfg.sae_k,
            auxk=cfg.sae_auxk, retrain=summary.embedded_now > 0,
        ))
    return summary


def _legacy_demo_index(out: Path, images_dir: Path) -> bool:
    """A finished index of these demo images made by the old random-weight demo model?"""
    from saefe.demo.tiny_model import LEGACY_MODEL_IDS

    try:
        m = read_manifest(out)
    except (OSError, ValueError):
        return False
    if not m or not m.get("complete"):
        return False
    key = m.get("build_key", {})
    return key.get("model") in LEGACY_MODEL_IDS and Path(str(key.get("source", ""))).resolve() == images_dir.resolve()


def _sae_is_stale(sae_dir: Path, store: EmbeddingStore) -> bool:
    """A finished SAE trained on another encoder's embeddings than the index holds."""
    try:
        enc = read_json(sae_dir / "config.json").get("encoder")
    except (OSError, ValueError, AttributeError):
        return True
    return enc != store.encoder_info.to_dict()


def demo_sae_and_labels(index_dir: Path, sae_dir: Path, annotations: Path, progress: bool = True,
                        d_hidden: int = DEMO_SAE_D_HIDDEN, k: int = DEMO_SAE_K, auxk: bool = DEMO_SAE_AUXK,
                        retrain: bool = False) -> dict[str, str]:
    """Train (unless done) the demo SAE, encode the corpus, build label profiles and attributes.

    ``retrain``: the index was (re-)embedded in this run, so a finished SAE is out of date."""
    from saefe.labels.annotations import read_annotations
    from saefe.labels.profiles import build_profiles
    from saefe.sae.model import TopKSAE
    from saefe.sae.codes import encode_corpus
    from saefe.sae.train import TrainConfig, train_sae

    report = sae_dir / "report.json"
    store = EmbeddingStore.open(index_dir)
    stale = report.exists() and (retrain or _sae_is_stale(sae_dir, store))
    if not report.exists() or stale:
        print(f"{'retraining' if stale else 'training'} the demo SAE into {sae_dir}", flush=True)
        if stale:
            report.unlink()
        train_sae(TrainConfig(index_dir=str(index_dir), out_dir=str(sae_dir), d_hidden=d_hidden, k=k,
                              auxk=auxk, progress=progress, resume=not stale))
    encode_corpus(index_dir, sae_dir, progress=progress)
    sae = TopKSAE.from_pretrained(sae_dir)
    membership = read_annotations(annotations, store)
    labels_dir = sae_dir / "labels"
    build_profiles(store, sae, membership, sae_dir=sae_dir).save(labels_dir)
    write_attributes(store, membership)
    from saefe.analysis.audit import fit_bias_models
    from saefe.labels.attributes import read_attributes

    fit_bias_models(store, sae, sae_dir, read_attributes(store), labels_dir)  # probes + associations
    set_default_sae(store, sae_dir)
    val = (read_json(report) if report.exists() else {}).get("validation", {})
    stats = (f" (validation FVU {val['fvu']:.3f}, mean L0 {val['mean_l0']:.1f}, dead {val['dead_fraction']:.0%})"
             if {"fvu", "mean_l0", "dead_fraction"} <= set(val) else "")
    return {
        "sae": str(sae_dir) + stats,
        "label profiles": f"{labels_dir} ({len(membership.labels)} labels)",
    }
