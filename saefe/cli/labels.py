"""CLI glue."""

from __future__ import annotations

from pathlib import Path
from saefe.errors import SaefeError

import saefe.labels.profiles as _labels
import saefe.labels.prompts as _prompts

# ---- from saefe.labels.profiles

def labels_arguments(parser) -> None:
    parser.add_argument("--index", required=True, help="index dir (embedding store)")
    parser.add_argument("--sae", required=True, help="SAE dir (weights/NAME)")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--annotations", help="EMOTIC-style CSV (Filename + 0/1 label columns, Gender, Age, VAD)")
    src.add_argument("--folders", help="a dir with one sub-folder of images per label")
    src.add_argument("--texts", help="JSON {label: prompt} or lines label<TAB>prompt")
    parser.add_argument("--out", help="output dir (default: SAE_DIR/labels)")
    parser.add_argument("--top-k", type=int, default=_labels.DEFAULT_TOP_K, help="shared/distinct features per label (10)")
    parser.add_argument("--top-n", type=int, default=_labels.DEFAULT_TOP_N, help="--texts: images retrieved per prompt (50)")
    parser.add_argument("--model", help="--texts: text encoder (default: the index's model; 'demo' = tiny model)")
    parser.add_argument("--vad-high", type=float, default=7.0, help="Valence/Arousal/Dominance >= this: '<X> high'")
    parser.add_argument("--vad-low", type=float, default=3.0, help="Valence/Arousal/Dominance <= this: '<X> low'")
    parser.add_argument("--no-probes", action="store_true",
                        help="skip the demographic probes and feature-attribute associations (used by --debias, audit)")


def _bias_models(store, sae, sae_dir, out: Path) -> None:
    from saefe.analysis.audit import FEATURE_BIAS, fit_bias_models
    from saefe.labels.attributes import read_attributes
    from saefe.labels.probes import PROBES_FILE, probe_summary

    probes, assoc = fit_bias_models(store, sae, sae_dir, read_attributes(store), out)
    if probes is not None:
        print(f"demographic probes: {probe_summary(probes)} -> {out / PROBES_FILE}")
    if assoc:
        print(f"feature-attribute associations ({', '.join(assoc)}) -> {out / FEATURE_BIAS}")


def _format_table(profiles: _labels.LabelProfiles, n_feats: int = 5) -> str:
    width = max([5] + [len(l) for l in profiles.labels])
    lines = [f"{'label':<{width}}  {'images':>6}  top distinct features"]
    for l, c in zip(profiles.labels, profiles.counts):
        feats = " ".join(f"f{f}" for f in profiles.distinct(l, k=n_feats))
        lines.append(f"{l:<{width}}  {int(c):>6}  {feats}")
    return "\n".join(lines)


def run_labels(args) -> int:
    from saefe.sae.model import TopKSAE
    from saefe.ingest.store import EmbeddingStore

    if args.top_k < 1:
        raise SaefeError(f"--top-k must be at least 1, got {args.top_k}")
    store = EmbeddingStore.open(args.index)
    sae = TopKSAE.from_pretrained(args.sae)
    sae.check_input(store.encoder_info, store.dim, f"the index at {args.index}")
    if args.annotations:
        from saefe.labels.annotations import read_annotations

        membership = read_annotations(args.annotations, store, vad_high=args.vad_high, vad_low=args.vad_low)
    elif args.folders:
        from saefe.labels.annotations import membership_from_folders

        membership = membership_from_folders(store, args.folders)
    else:
        from saefe.ingest.encoder import SiglipEncoder

        prompts = _prompts.read_prompts(args.texts)
        encoder = SiglipEncoder.from_pretrained(args.model or store.encoder_info.model_id)
        index = None
        if (store.data / "index.faiss").exists():
            from saefe.ingest.index import VectorIndex

            index = VectorIndex.load(store.data)
        membership = _prompts.membership_from_texts(store, index, encoder, prompts, top_n=args.top_n)
        membership.report.source = str(args.texts)
    profiles = _labels.build_profiles(store, sae, membership, sae_dir=args.sae, top_k=args.top_k)
    out = Path(args.out) if args.out else Path(args.sae) / "labels"
    profiles.save(out)
    from saefe.labels.attributes import set_default_sae, write_attributes

    if args.annotations or args.folders:  # per-image labels: ground truth for bias and evaluation
        params = {"vad_high": args.vad_high, "vad_low": args.vad_low} if args.annotations else {}
        print(f"wrote {write_attributes(store, membership, **params)}")
        if not args.no_probes:
            _bias_models(store, sae, args.sae, out)
    if not store.manifest.get("default_sae"):
        set_default_sae(store, Path(args.sae))
    print(_format_table(profiles))
    if profiles.skipped:
        print(f"skipped (no image): {', '.join(profiles.skipped)}")
    rep = membership.report
    if rep.unmatched_rows or rep.ambiguous_rows:
        print(f"{rep.unmatched_rows} rows not in the corpus, {rep.ambiguous_rows} ambiguous (see the log)")
    print(f"wrote {out / _labels.PROFILES_FILE} and {out / _labels.LABELS_FILE}")
    return 0
