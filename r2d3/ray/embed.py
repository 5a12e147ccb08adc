"""Precompute prompt embeddings on Ray Data: Parquet prompt shards -> a pool of encoder actors ->
Parquet embedding shards (the format of :mod:`r2d3.data.embeddings`) that training reads through
``data.embeddings`` instead of running the text encoder on every batch.

    read_parquet(readable shards) -> repartition(whole batches, ~4 blocks per actor)
        -> map_batches(EncoderActor, ActorPoolStrategy(size=actors)) -> write_parquet(output)
        -> output/_manifest.json (counts, encoder fingerprint, skipped shards)

Each actor loads the backend once and encodes whole batches; bad prompt cells are skipped (the same
rules as training), unreadable shards are skipped with a reason, as in training.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data

from r2d3.backends import load_backend
from r2d3.data.embeddings import (
    encode_table,
    encoder_fingerprint,
    parquet_row_count,
    summarize_embeddings,
    write_manifest,
)
from r2d3.data.prompts import PromptSourceError, check_shards
from r2d3.ray.actors import actor_device
from r2d3.ray.connect import init_ray
from r2d3.storage import files_under, filesystem

log = logging.getLogger(__name__)


class EncoderActor:
    """One backend per actor process; ``__call__`` turns a batch of prompt cells into embedding rows."""

    def __init__(self, backend_name: str, weights: str | None, column: str, device: str):
        self.backend = load_backend(backend_name, weights=weights, device=actor_device(device))
        self.fingerprint = encoder_fingerprint(self.backend)
        self.column = column

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_table(self.backend, batch.column(self.column).to_pylist(), self.fingerprint)


def _local_or_uri(path: str) -> str:
    """URIs as given; local paths absolute (Ray's read and write tasks need not share the driver's cwd)."""
    return path.rstrip("/") if "://" in path else str(Path(path).expanduser().resolve())


def _has_files(uri: str) -> bool:
    return bool(files_under(*filesystem(uri)))


def _check_paths(source: str, output: str, overwrite: bool) -> None:
    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    globbed = [source.find(c) for c in "*?[" if c in source]
    if globbed:  # a glob reads (recursively) below the directory its pattern starts in
        source = source[: source.rfind("/", 0, min(globbed))]
    if inside(output, source) or inside(source, output):
        raise ValueError(f"output {output} overlaps the input {source}; write the embeddings somewhere else")
    if not overwrite and _has_files(output):
        raise FileExistsError(f"output {output} is not empty; pass overwrite=True (--overwrite) to replace "
                              "its contents")


def _start_ray(actor_cpus: int) -> None:
    """Join ``RAY_ADDRESS`` (``ray job submit``) or start a local instance. Ray Data's read and write
    tasks need a CPU beside the actors' or the pipeline stalls, so a local instance gets at least two
    logical CPUs more than the actors reserve (a 2-core machine with 2 actors: 4)."""
    init_ray(num_cpus=max(os.cpu_count() or 1, actor_cpus + 2))
    cpus = ray.cluster_resources().get("CPU", 0)
    if cpus < actor_cpus + 1:
        log.warning("the encoder actors reserve %d of the cluster's %g CPUs, leaving none for reading and "
                    "writing: the pipeline waits until the cluster grows (lower --actors or --cpus-per-actor)",
                    actor_cpus, cpus)


def embed_prompts(source: str, output: str, backend_name: str = "tiny", weights: str | None = None,
                  column: str = "prompt", actors: int = 2, batch_size: int = 256, cpus_per_actor: float = 1.0,
                  gpus_per_actor: float = 0.0, overwrite: bool = False) -> dict[str, Any]:
    """Embed every usable prompt of the Parquet shards at ``source`` into ``output`` (local or s3://).

    Starts a local Ray instance when none is running (``ray job submit`` sets ``RAY_ADDRESS``).
    Returns (and writes to ``output/_manifest.json``) the counts: ``rows_in`` (rows of the readable
    shards), ``embedded``, ``skipped_rows`` (bad cells), plus the encoder fingerprint and the skipped
    shards with their reasons."""
    if actors < 1 or batch_size < 1 or cpus_per_actor < 0 or gpus_per_actor < 0:
        raise ValueError(f"need actors >= 1, batch_size >= 1 and non-negative resources "
                         f"(got actors={actors}, batch_size={batch_size}, cpus_per_actor={cpus_per_actor}, "
                         f"gpus_per_actor={gpus_per_actor})")
    source, output = _local_or_uri(source), _local_or_uri(output)
    if weights is not None and "://" not in weights and Path(weights).expanduser().exists():
        weights = str(Path(weights).expanduser().resolve())  # actors need not share the driver's cwd
    _check_paths(source, output, overwrite)
    shards = check_shards(source, column)  # PromptSourceError when nothing is readable
    rows_in = parquet_row_count(shards.files)
    _start_ray(math.ceil(actors * cpus_per_actor))
    start = time.time()
    # Prompts are few bytes but much compute: Ray reads small shards as one block, which one actor would
    # encode alone. Stream them into blocks of whole batches, about four per actor (at most 16 batches a
    # block, which is also the size of an output file).
    batches_per_block = min(max(math.ceil(rows_in / (4 * actors * batch_size)), 1), 16)
    ds = ray.data.read_parquet(shards.files).select_columns([column])
    ds = ds.repartition(target_num_rows_per_block=batches_per_block * batch_size)
    ds = ds.map_batches(
        EncoderActor,
        fn_constructor_kwargs={"backend_name": backend_name, "weights": weights, "column": column,
                               "device": "auto"},
        batch_size=batch_size, batch_format="pyarrow", zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus_per_actor,
        **({"num_gpus": gpus_per_actor} if gpus_per_actor > 0 else {}),
    )
    ds.write_parquet(output, mode=ray.data.SaveMode.OVERWRITE if overwrite else ray.data.SaveMode.APPEND)
    seconds = time.time() - start
    written = summarize_embeddings(output)
    if len(written.encoders) > 1:  # actors on different nodes loaded different weights from the same path
        log.error("embeddings in %s come from %d different encoders: %s", output, len(written.encoders),
                  written.encoders)
    counts = {
        "rows_in": rows_in, "embedded": written.rows, "skipped_rows": rows_in - written.rows,
        "encoder": next(iter(written.encoders)) if len(written.encoders) == 1 else written.encoders or None,
        "backend": backend_name, "weights": weights, "input": source, "output": output, "column": column,
        "shards_in": len(shards.files), "shards_written": len(written.files),
        "skipped_shards": [{"shard": s, "reason": r} for s, r in shards.skipped],
        "actors": actors, "batch_size": batch_size, "seconds": round(seconds, 3),
    }
    counts["manifest"] = write_manifest(output, counts)
    if not written.rows:
        raise PromptSourceError(f"no usable prompt in {source}: {rows_in} rows, none embedded")
    return counts
