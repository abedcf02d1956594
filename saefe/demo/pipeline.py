"""The built-in offline demo, end to end: generate the corpus, embed it with the demo model,
then train its SAE, store its codes and profile its labels.

So that ``python scripts/build_index.py`` alone leaves everything the app needs. The demo sits on
top of the stages and calls them; no stage imports it. Each step is skipped when its output is
already there (a re-run is cheap and resumes an interrupted one).
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
DEMO_DEDUP_THRESHOLD = 0.9995


@dataclass(frozen=True)
class DemoBuildConfig:
    """The demo's knobs; ``build`` carries the stage's own config (out dir, model, index...)."""

    build: BuildConfig = field(default_factory=lambda: BuildConfig(out=DEMO_INDEX))
    n: int = 3000
    seed: int = 0
    sae_out: str = DEMO_SAE
    with_sae: bool = True


def build_demo(cfg: DemoBuildConfig) -> BuildSummary:
    """Generate the demo corpus, build its index, then its SAE, codes and label profiles."""
    from saefe.demo.corpus import DemoConfig, generate_demo

    out = Path(cfg.build.out)
    corpus = generate_demo(out / "demo", DemoConfig(n=cfg.n, seed=cfg.seed), progress=cfg.build.progress)
    print(f"demo images: {corpus.images_dir}\ndemo annotations: {corpus.annotations}", flush=True)
    summary = build_index(replace(cfg.build, images=str(corpus.images_dir)))
    # The random-weight demo model puts different pictures above cosine 0.99 (real SigLIP keeps that
    # for near-copies): only exact copies count as near-duplicates in the demo.
    if "dedup_threshold" not in (read_manifest(out) or {}):
        set_manifest_setting(out, "dedup_threshold", DEMO_DEDUP_THRESHOLD)
    summary.extras["demo images"] = str(corpus.images_dir)
    summary.extras["demo annotations"] = str(corpus.annotations)
    if cfg.with_sae:
        summary.extras.update(demo_sae_and_labels(out, Path(cfg.sae_out), corpus.annotations, cfg.build.progress))
    return summary


def demo_sae_and_labels(index_dir: Path, sae_dir: Path, annotations: Path, progress: bool = True) -> dict[str, str]:
    from saefe.labels.annotations import read_annotations
    from saefe.labels.profiles import build_profiles
    from saefe.sae.model import TopKSAE
    from saefe.sae.codes import encode_corpus
    from saefe.sae.train import TrainConfig, train_sae

    report = sae_dir / "report.json"
    if not report.exists():
        print(f"training the demo SAE into {sae_dir}", flush=True)
        train_sae(TrainConfig(index_dir=str(index_dir), out_dir=str(sae_dir), progress=progress))
    encode_corpus(index_dir, sae_dir, progress=progress)
    store = EmbeddingStore.open(index_dir)
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
