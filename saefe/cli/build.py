"""``saefe build``: arguments and printing; the work is in saefe.ingest.build (and saefe.demo
for the no-source offline demo)."""

from __future__ import annotations

import argparse
from saefe.errors import SaefeError

import saefe.ingest.build as _build
from saefe.ingest.index import parse_bytes
from saefe.demo.pipeline import DEMO_INDEX, DEMO_SAE, DemoBuildConfig, build_demo


def build_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("source (none: build the offline demo)")
    src.add_argument("--images", help="folder of images (recursive)")
    src.add_argument("--dataset", help="local Hugging Face dataset: imagefolder/parquet/webdataset dir or file, or a saved dataset")
    src.add_argument("--split", default="train")
    src.add_argument("--image-column", help="dataset column holding images (default: detected)")
    src.add_argument("--dataset-builder", help="force a datasets builder, e.g. webdataset, parquet, imagefolder")
    src.add_argument("--embeddings", help=".npy of precomputed vectors (imported, not re-embedded)")
    src.add_argument("--metadata", help="CSV/Parquet of metadata row-aligned with --embeddings")
    p.add_argument("--out", default=None, help=f"index dir (default {DEMO_INDEX} for the demo)")
    p.add_argument("--model", default="demo", help="SigLIP hub id or local dir; 'demo' = built-in tiny model")
    p.add_argument("--clip-server", help="embed through a running clip_server at this URL instead")
    p.add_argument("--device", help="cuda / cpu (default: cuda when present)")
    p.add_argument("--index-type", default="auto", choices=_build.KINDS)
    p.add_argument("--flat-max", type=int, default=_build.IndexConfig.flat_max, help="auto: exact search up to this many vectors")
    p.add_argument("--nprobe", type=int, default=0, help="IVF probes (0: tuned for --target-recall)")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--max-index-memory", default=None, metavar="SIZE",
                   help="RAM the index may take, e.g. 4G or 512M: picks the index type and quantisation (default: no limit)")
    p.add_argument("--min-speedup", type=float, default=_build.IndexConfig.min_speedup,
                   help="auto keeps an approximate index only if this much faster than exact search (measured)")
    p.add_argument("--chunk-size", type=int, default=1024, help="images per committed chunk")
    p.add_argument("--loader-workers", type=int, default=0,
                   help="threads reading, decoding and pre-processing ahead of the model (default: one per core)")
    p.add_argument("--loader-processes", type=int, default=None, metavar="N",
                   help="do that work in N worker processes instead (default: on a GPU one per core but two, "
                        "where they outpace threads; 0: threads)")
    p.add_argument("--batch-size", "--ray-batch-size", dest="batch_size", type=int, default=0,
                   help="images per model call (default 256 on a GPU, 64 on CPUs; halved when a batch does not fit the GPU)")
    p.add_argument("--force", action="store_true",
                   help="re-embed everything (default on an existing index: update it, embedding only new and changed images)")
    from saefe.ingest.distributed.distributor import RayConfig

    ray = p.add_argument_group('distributed (pip install -e ".[distributed]")')
    ray.add_argument("--ray", metavar="ADDRESS", help="embed on Ray: 'local' starts it here, 'auto' or ray://host:port joins a cluster")
    ray.add_argument("--ray-cpus", type=int, default=None, help="--ray local: CPUs Ray may use (default all)")
    ray.add_argument("--ray-task-size", type=int, default=RayConfig.task_size,
                     help=f"images per decode task (default {RayConfig.task_size}; a chunk is cut into tasks)")
    p.add_argument("--no-progress", action="store_true")
    demo = p.add_argument_group("demo")
    demo.add_argument("--demo-n", type=int, default=3000, help="demo corpus size")
    demo.add_argument("--demo-seed", type=int, default=0)
    demo.add_argument("--sae-out", default=DEMO_SAE, help="where the demo's SAE and labels go")
    demo.add_argument("--no-sae", action="store_true", help="demo: skip SAE training and label profiles")


def is_demo(args: argparse.Namespace) -> bool:
    return not (args.images or args.dataset or args.embeddings)


def config_from_args(args: argparse.Namespace) -> _build.BuildConfig:
    if args.metadata and not args.embeddings:
        raise SaefeError("--metadata goes with --embeddings")
    if sum(bool(x) for x in (args.images, args.dataset, args.embeddings)) > 1:
        raise SaefeError("choose one source: --images, --dataset or --embeddings")
    if not is_demo(args) and not args.out:
        raise SaefeError("--out is required when a source is given (e.g. --out index/mycorpus)")
    return _build.BuildConfig(
        out=args.out or DEMO_INDEX,
        images=args.images,
        dataset=args.dataset,
        split=args.split,
        image_column=args.image_column,
        dataset_builder=args.dataset_builder,
        embeddings=args.embeddings,
        metadata=args.metadata,
        model=args.model,
        clip_server=args.clip_server,
        device=args.device,
        index=_build.IndexConfig(kind=args.index_type, flat_max=args.flat_max, nprobe=args.nprobe, target_recall=args.target_recall,
                                 max_memory=parse_bytes(args.max_index_memory), min_speedup=args.min_speedup),
        chunk_size=args.chunk_size,
        loader_workers=args.loader_workers,
        loader_processes=args.loader_processes,
        batch_size=args.batch_size,
        force=args.force,
        progress=not args.no_progress,
    )


def run_build(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if is_demo(args) and args.ray:
        raise SaefeError("--ray builds from --images or --dataset (the demo is built in this process)")
    if is_demo(args):
        summary = build_demo(DemoBuildConfig(build=cfg, n=args.demo_n, seed=args.demo_seed, sae_out=args.sae_out,
                                             with_sae=not args.no_sae))
    elif args.ray:
        if args.embeddings:
            raise SaefeError("--ray embeds images; --embeddings imports vectors that need no embedding")
        from saefe.ingest.distributed.distributor import RayConfig
        from saefe.ingest.distributed.runner import build_with_ray

        if args.ray_task_size < 1:
            raise SaefeError("--ray-task-size must be at least 1")
        summary = build_with_ray(cfg, RayConfig(address=args.ray, num_cpus=args.ray_cpus, embed_batch_size=args.batch_size,
                                                task_size=args.ray_task_size))
    else:
        summary = _build.build_index(cfg)
    print("\n".join(summary.lines()))
    return 0
