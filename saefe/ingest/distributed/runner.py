"""``build_with_ray``: the single-process build (build.build_index) with its embedding step run as
a Ray Data pipeline: shard rows -> DecodePreprocess (CPU actors) -> Embed (one actor per GPU, or
CPU actors) -> the driver's ShardAssembler, which commits chunks exactly as the plain build does.
Everything before (corpus scan, build key, resume bookkeeping) and after (store, manifest, skip
counts, index) is build.py's own code, so both paths produce the same artefacts.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from saefe.errors import SaefeError
from saefe.ingest.build import BuildConfig, BuildSummary, build_index
from saefe.ingest.distributed.distributor import RayConfig, failure, session
from saefe.ingest.distributed.reader import CorpusSpec, shard_dataset, shard_rows
from saefe.ingest.distributed.writer import ShardAssembler, ShardStage
from saefe.ingest.encoder import default_batch_size
from saefe.manifest import EncoderInfo, read_json

log = logging.getLogger(__name__)


class RayEmbedder:
    """build.ChunkEmbedder that runs the missing chunks on a Ray cluster."""

    def __init__(self, rc: RayConfig):
        self.rc = rc
        self.info: EncoderInfo | None = None

    def prepare(self, cfg: BuildConfig) -> EncoderInfo:
        if cfg.clip_server:
            raise SaefeError("--ray embeds with a local --model on the cluster's workers; drop --clip-server")
        try:
            import ray.data  # noqa: F401
        except ImportError:
            raise SaefeError('--ray needs Ray Data: pip install -e ".[distributed]"') from None
        from saefe.ingest.encoder import encoder_info

        self.info = encoder_info(cfg.model)
        return self.info

    def plan(self, cluster, n_shards: int) -> dict[str, Any]:
        """Stages and actor counts. With GPUs: a model actor per GPU, the other CPUs decode.
        Without: one fused decode+embed actor per CPU (``RayConfig.fused=False`` keeps the GPU
        layout's two stages on CPU actors)."""
        from ray.data import ActorPoolStrategy

        rc = self.rc
        if cluster.gpus:
            embed = dict(compute=ActorPoolStrategy(size=cluster.gpus), num_gpus=1, num_cpus=1)
            cpus_left = max(1, cluster.cpus - cluster.gpus)
            batch, dtype, device, fused = rc.embed_batch_size or default_batch_size("cuda"), "float16", "cuda", False
        else:
            fused = rc.fused is not False
            n_embed = max(1, min(n_shards, cluster.cpus if fused else cluster.cpus // 2))
            embed = dict(compute=ActorPoolStrategy(size=n_embed, max_tasks_in_flight_per_actor=1 if fused else None), num_cpus=1)
            cpus_left = max(1, cluster.cpus - n_embed)
            batch, dtype, device = rc.embed_batch_size or default_batch_size("cpu"), "float32", "cpu"
        n_decode = max(1, min(rc.decode_actors or cpus_left, n_shards))
        decode = dict(compute=ActorPoolStrategy(min_size=1, max_size=n_decode), num_cpus=1)
        return dict(embed=embed, decode=decode, batch=batch, dtype=dtype, device=device, fused=fused)

    def pipeline(self, rows, spec: CorpusSpec, model: str, p: dict[str, Any]):
        from saefe.ingest.distributed.mapper import DecodeEmbed, DecodePreprocess, Embed

        ds = shard_dataset(rows)
        if p["fused"]:
            return ds.map_batches(DecodeEmbed, batch_size=1, batch_format="numpy",
                                  fn_constructor_kwargs=dict(spec=spec, model=model, fault=self.rc.fault, batch_size=p["batch"]),
                                  **p["embed"])
        return (
            ds.map_batches(DecodePreprocess, batch_size=1, batch_format="numpy",
                           fn_constructor_kwargs=dict(spec=spec, model=model, pixel_dtype=p["dtype"], fault=self.rc.fault),
                           **p["decode"])
            .map_batches(Embed, batch_size=p["batch"], batch_format="numpy",
                         fn_constructor_kwargs=dict(model=model, device=p["device"], batch_size=p["batch"]),
                         **p["embed"])
        )

    def embed(self, cfg, corpus, writer, todo, committed, seen, plan=None) -> int:
        import ray.data
        from tqdm import tqdm

        stage = ShardStage(writer.dir, read_json(writer.chunks / "build.json"))
        staged = stage.done()
        n = len(corpus)
        spans = {c: (c * cfg.chunk_size, min(n, (c + 1) * cfg.chunk_size)) for c in todo}
        run = [c for c in todo if c not in staged]
        # an update: the workers read only what the plan cannot answer from size + mtime
        items_of = {c: (spans[c][0] + np.flatnonzero(~plan.answered[slice(*spans[c])])).tolist() for c in run} \
            if plan is not None else None
        rows = shard_rows(corpus, cfg.chunk_size, run, self.rc.task_size, items_of)
        done_items = sum(min(cfg.chunk_size, n - c * cfg.chunk_size) for c in committed)
        spec = CorpusSpec.of(corpus, cfg.split, cfg.dataset_builder)
        bar = tqdm(total=n, initial=done_items, unit="img", desc="embedding (ray)", disable=not cfg.progress, smoothing=0.1)
        asm = ShardAssembler(writer, stage, spans, rows, seen, self.info.embedding_dim, progress=bar, plan=plan)
        asm.promote()  # shards staged by an earlier run, or that need no reading
        if not rows:
            bar.close()
            if asm.remaining:
                raise SaefeError(f"shard {asm.remaining[0]} is neither staged nor to do; run the same command again")
            stage.clear()
            return asm.embedded
        with session(self.rc) as cluster:
            p = self.plan(cluster, len(rows))
            ctx = ray.data.DataContext.get_current()
            ctx.execution_options.preserve_order = False  # the driver stages shards and commits them in order
            ctx.enable_progress_bars = False
            ctx.print_on_execution_start = False
            log.info("ray: %d CPUs, %d GPUs; %d shards; plan %s", cluster.cpus, cluster.gpus, len(rows), p)
            ds = self.pipeline(rows, spec, cfg.model, p)
            try:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    asm.add(batch)
            except SaefeError:
                raise
            except Exception as e:  # a lost node or cluster, Ray's own errors
                raise failure(e, len(asm.committed), len(todo), asm.remaining[0] if asm.remaining else None) from None
            finally:
                bar.close()
        if asm.failed:
            cid, err = min(asm.failed.items())
            raise SaefeError(
                f"{len(asm.failed)} shard(s) failed on the workers (first: shard {cid}: {err[:240]}); "
                f"{len(asm.committed)} of {len(todo)} shards of this run are committed, the finished others are "
                "kept; run the same command again to resume"
            )
        if asm.remaining:  # the pipeline ended without some items (should not happen)
            raise SaefeError(f"the Ray build returned without shard {asm.remaining[0]}; run the same command again to resume")
        stage.clear()
        return asm.embedded


    def map_shards(self, fn, jobs: list[tuple]) -> None:
        """Fill the on-disk index's shards (index_ondisk.fill_shard) as Ray tasks."""
        import ray

        with session(self.rc):
            task = ray.remote(fn).options(num_cpus=1, max_retries=3)
            try:
                ray.get([task.remote(*j) for j in jobs])
            except Exception as e:
                raise failure(e, 0, len(jobs), None) from None


def build_with_ray(cfg: BuildConfig, rc: RayConfig) -> BuildSummary:
    """Run (or resume, or confirm) a build whose embedding runs on Ray; see the module docstring."""
    return build_index(cfg, embedder=RayEmbedder(rc))
