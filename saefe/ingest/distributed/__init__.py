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

Re-running on a finished index is an update (saefe.ingest.update) with ``--ray`` too: its plan
runs in the driver, answers unchanged files from their size and mtime, and only the new and
changed files go to the workers; the plan's content-hash and read-error answers are applied by
the writer when it commits, so the generation is the one the single-process update writes.
"""
