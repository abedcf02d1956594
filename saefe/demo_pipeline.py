"""The demo's steps after embedding: train its SAE, store its codes, profile its labels.

So that ``python scripts/build_index.py`` alone leaves everything the app needs. Each step is
skipped when its output is already there (a re-run is cheap and resumes an interrupted one).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .attributes import set_default_sae, write_attributes
from .manifest import read_json
from .store import EmbeddingStore

log = logging.getLogger(__name__)


def demo_sae_and_labels(index_dir: Path, sae_dir: Path, annotations: Path, progress: bool = True) -> dict[str, str]:
    from .annotations import read_annotations
    from .labels import build_profiles
    from .sae import TopKSAE
    from .sae_codes import encode_corpus
    from .sae_train import TrainConfig, train_sae

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
    set_default_sae(store, sae_dir)
    val = (read_json(report) if report.exists() else {}).get("validation", {})
    stats = (f" (validation FVU {val['fvu']:.3f}, mean L0 {val['mean_l0']:.1f}, dead {val['dead_fraction']:.0%})"
             if {"fvu", "mean_l0", "dead_fraction"} <= set(val) else "")
    return {
        "sae": str(sae_dir) + stats,
        "label profiles": f"{labels_dir} ({len(membership.labels)} labels)",
    }
