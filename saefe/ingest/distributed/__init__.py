"""``saefe build ... --ray ADDRESS``: the build's reading, safe decoding and embedding as Ray Data
stages, shaped like clip-retrieval's ``clip_inference``:

    reader.py       corpus -> one row per shard (= the single-process build's chunk) of item refs
    mapper.py       DecodePreprocess (CPU actors: read, hash, safe decode, image processor) and
                    Embed (one model actor per GPU, CPU actors otherwise) for ``map_batches``
    writer.py       driver side: items back into shards, committed in corpus order through the
                    same ``triage`` + ``ChunkWriter.commit`` as the single-process build
    runner.py       ``RayEmbedder`` (a build.ChunkEmbedder) and ``build_with_ray``
    distributor.py  start or join Ray, describe failures

Shards are the build's committed chunks, so a Ray build resumes a plain one and vice versa, and
the finished store, manifest, skip counts and index come from the same code in build.py.

A first build embeds on Ray. Re-running on a finished index is an update (saefe.ingest.update):
its plan (reuse / skip / embed per file) runs in the driver's process as without ``--ray``, and
so does the embedding of the new and changed files; moving that to Ray means sending only the
plan's unanswered items to the workers and resolving ``after_hash`` / ``on_read_error`` in the
driver (not done yet).
"""
