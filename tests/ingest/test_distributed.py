"""`saefe build --ray local`: same store as the plain build, resumable, failures reported.

One local Ray (2 CPUs) is shared by the whole module: starting it costs several seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ray = pytest.importorskip("ray")

from saefe.errors import SaefeError  # noqa: E402
from saefe.ingest.build import BuildConfig, build_index  # noqa: E402
from saefe.ingest.distributed.distributor import RayConfig, connect, failure  # noqa: E402
from saefe.ingest.distributed.runner import build_with_ray  # noqa: E402
from saefe.ingest.distributed.writer import ShardAssembler, ShardStage  # noqa: E402
from saefe.ingest.store import ChunkWriter  # noqa: E402

from fixtures.folders import make_folder  # noqa: E402

CHUNK = 7


@pytest.fixture(scope="module")
def cluster():
    connect(RayConfig("local", num_cpus=2, object_store_memory=256 << 20))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def plain(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "index"
    build_index(BuildConfig(images=str(corpus), out=str(out), chunk_size=CHUNK, progress=False))
    return out


def _cfg(corpus, out) -> BuildConfig:
    return BuildConfig(images=str(corpus), out=str(out), chunk_size=CHUNK, progress=False)


def assert_same_store(a: Path, b: Path) -> None:
    va, vb = np.load(a / "vectors.npy").astype(np.float32), np.load(b / "vectors.npy").astype(np.float32)
    assert va.shape == vb.shape
    assert (va * vb).sum(1).min() > 0.999  # fp16 stores of the same embeddings
    pd.testing.assert_frame_equal(pd.read_parquet(a / "metadata.parquet"), pd.read_parquet(b / "metadata.parquet"))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    for key in ("count", "dim", "encoder", "skipped", "skipped_items", "duplicates", "index_type", "build_key"):
        assert ma[key] == mb[key], key
    assert not (b / "chunks").exists()


def test_ray_build_matches_plain_build(cluster, corpus, plain, tmp_path):
    out = tmp_path / "ray"
    s = build_with_ray(_cfg(corpus, out), RayConfig("local"))
    assert s.count == 21 and s.duplicates == 1 and s.embedded_now == 21
    assert s.skipped == {"empty file": 1, "not an image": 1, "truncated image": 1}
    assert_same_store(plain, out)
    again = build_with_ray(_cfg(corpus, out), RayConfig("local"))
    assert again.already_built and again.embedded_now == 0


def test_failing_shard_is_reported_and_resumed_without_redoing_shards(cluster, corpus, plain, tmp_path):
    out = tmp_path / "ray"
    with pytest.raises(SaefeError, match=r"1 shard\(s\) failed .*shard 2: InjectedFault: injected failure in shard 2.*"
                                         r"2 of 4 shards .*run the same command again"):
        build_with_ray(_cfg(corpus, out), RayConfig("local", fault={"shard": 2, "mode": "raise"}))
    assert sorted(p.name for p in (out / "chunks").glob("0*.json")) == ["000000.json", "000001.json"]
    assert sorted(p.name for p in (out / "chunks" / "staged").glob("0*.json")) == ["000003.json"]  # done, waits for 2
    kept = sum(json.loads((out / "chunks" / f"00000{c}.json").read_text())["count"] for c in (0, 1))
    staged = json.loads((out / "chunks" / "staged" / "000003.json").read_text())["vectors"]
    # shards 0, 1 (committed) and 3 (staged) are not redone: faults planted there cannot fire
    s = build_with_ray(_cfg(corpus, out), RayConfig("local", fault={"shard": [0, 1, 3], "mode": "raise"}))
    assert s.embedded_now == 21 - kept - staged and s.count == 21  # shard 2 only
    assert_same_store(plain, out)


def test_worker_that_dies_mid_shard_is_restarted(cluster, corpus, plain, tmp_path):
    """The GPU layout (decode actors -> model actors, here on CPUs); a decode worker dies once."""
    out = tmp_path / "ray"
    marker = tmp_path / "died"
    build_with_ray(_cfg(corpus, out), RayConfig("local", fused=False, fault={"shard": 1, "mode": "exit", "marker": str(marker)}))
    assert marker.exists()  # the worker did die once
    assert_same_store(plain, out)


def test_lost_cluster_keeps_finished_shards(tmp_path):
    """The driver's side of a cluster going away mid-run: complete shards are staged and the
    staged prefix committed in order; a half-received shard is not; the error says how to resume."""
    writer = ChunkWriter(tmp_path, {"k": 1})
    stage = ShardStage(tmp_path, {"k": 1})
    rows = [{"shard": 0, "items": [0]}, {"shard": 0, "items": [1]}]  # shard 0 as two tasks
    rows += [{"shard": s, "items": [2 * s, 2 * s + 1]} for s in range(1, 4)]
    spans = {s: (2 * s, 2 * s + 2) for s in range(4)}
    asm = ShardAssembler(writer, stage, spans, rows, set(), dim=4)

    def batch(items):
        return {"shard": np.array([i // 2 for i in items]), "item": np.array(items),
                "meta": np.array([json.dumps({"path": f"{i}.png", "sha256": str(i % 5)}) for i in items], dtype=object),
                "reason": np.array([""] * len(items), dtype=object), "ok": np.ones(len(items), bool),
                "vector": np.ones((len(items), 4), np.float16)}

    asm.add(batch([2, 3, 6]))  # shard 1 complete but shard 0 is not: staged, not committed
    assert writer.committed() == {} and stage.done() == {1}
    asm.add(batch([0, 1, 4]))
    assert sorted(writer.committed()) == [0, 1] and asm.remaining == [2, 3] and stage.done() == set()
    err = failure(ConnectionError("Ray client lost the connection"), len(asm.committed), 4, asm.remaining[0])
    assert "stopped at shard 2 (ConnectionError: Ray client lost the connection)" in str(err)
    assert "2 of 4 shards" in str(err) and "\n" not in str(err)
    # the next run: shard 2 again, then 3; item 5 (hash "0") duplicates item 0
    asm = ShardAssembler(writer, stage, {2: spans[2], 3: spans[3]}, rows[3:], {"0", "1", "2", "3"}, dim=4)
    asm.add(batch([7, 4, 5, 6]))
    assert sorted(writer.committed()) == [0, 1, 2, 3]
    assert writer.committed()[2].count == 1
    assert writer.committed()[2].skipped == [{"item": "5.png", "reason": "duplicate", "sha256": "0"}]


def test_encode_sae_on_ray_matches_local(cluster, tmp_path):
    import torch

    from saefe.manifest import EncoderInfo
    from saefe.sae.codes import encode_corpus, load_codes
    from saefe.sae.metrics import planted_data
    from saefe.sae.model import SAEConfig, TopKSAE
    from saefe.ingest.store import write_store

    info = EncoderInfo("demo/tiny-siglip", 24, (64, 64))
    x, _ = planted_data(500, 24, 40, 3, seed=5)
    torch.manual_seed(0)
    TopKSAE(SAEConfig(24, 96, 5), info).save_pretrained(tmp_path / "w" / "s")
    for name in ("a", "b"):
        write_store(tmp_path / name, x, None, info)
    encode_corpus(tmp_path / "a", tmp_path / "w" / "s", chunk_size=128, progress=False)
    encode_corpus(tmp_path / "b", tmp_path / "w" / "s", chunk_size=128, progress=False, ray="local")
    (a, _), (b, _) = load_codes(tmp_path / "a", tmp_path / "w" / "s"), load_codes(tmp_path / "b", tmp_path / "w" / "s")
    assert a.shape == b.shape and abs(a - b).max() < 1e-5


def test_cli_refuses_ray_without_a_source(capsys):
    from saefe.cli.main import main as cli

    assert cli(["build", "--ray", "local"]) != 0
    assert "--ray builds from --images or --dataset" in capsys.readouterr().err


def test_ondisk_index_shards_filled_by_ray_tasks(cluster, corpus, plain, tmp_path):
    from saefe.ingest.index import IndexConfig, VectorIndex

    cfg = _cfg(corpus, tmp_path / "ray")
    cfg.index = IndexConfig(kind="ivfpq-ondisk", use_gpu=False, ondisk={"shard_size": 8, "nprobe": 1, "rerank": 50})
    s = build_with_ray(cfg, RayConfig("local"))
    assert s.index_type == "ivfpq-ondisk"
    vi = VectorIndex.load(tmp_path / "ray")
    vectors = np.load(tmp_path / "ray" / "vectors.npy").astype(np.float32)
    assert vi.search(vectors[:4], 1)[1][:, 0].tolist() == [0, 1, 2, 3]


def test_ray_update_follows_the_same_plan_as_a_plain_update(cluster, corpus, tmp_path):
    """Re-running on a built index is an update: the plan (in the driver) answers unchanged files
    by size + mtime, the workers read only new and changed ones, and the result is the plain
    update's: same rows, vectors, skips and counts."""
    import os
    import shutil

    from fixtures.folders import _img

    results = {}
    for mode in ("plain", "ray"):
        root = tmp_path / mode / "corpus"
        shutil.copytree(corpus, root)
        out = tmp_path / mode / "index"
        build_index(_cfg(root, out))
        _img(123).save(root / "new_one.png")  # added
        _img(124).save(root / "img_007.png")  # changed content
        os.utime(root / "img_011.png", ns=(1, 1))  # touched only: hash says unchanged
        (root / "img_013.png").unlink()  # removed
        cfg = _cfg(root, out)
        if mode == "ray":  # the workers do read the new and changed files (and a failed run resumes)
            with pytest.raises(SaefeError, match="failed on the workers"):
                build_with_ray(cfg, RayConfig("local", fault={"shard": list(range(10)), "mode": "raise"}))
        results[mode] = build_with_ray(cfg, RayConfig("local")) if mode == "ray" else build_index(cfg)
    a, b = results["plain"], results["ray"]
    assert a.update == b.update and a.update["added"] == 1 and a.update["removed"] == 1
    assert a.embedded_now == b.embedded_now == 2 and a.count == b.count
    from saefe.ingest.store import EmbeddingStore

    sa, sb = EmbeddingStore.open(tmp_path / "plain" / "index"), EmbeddingStore.open(tmp_path / "ray" / "index")
    pd.testing.assert_frame_equal(sa.metadata.drop(columns=["mtime_ns"]), sb.metadata.drop(columns=["mtime_ns"]))
    assert (sa.vectors_f32() * sb.vectors_f32()).sum(1).min() > 0.999
    assert sa.manifest["skipped"] == sb.manifest["skipped"]
