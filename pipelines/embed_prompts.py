"""Precompute prompt embeddings with Ray Data into Parquet that training reuses (data.embeddings=...).

    python pipelines/embed_prompts.py --input prompts/ --output embeddings/            # local Ray
    python pipelines/embed_prompts.py --input s3://bucket/prompts --output s3://bucket/emb \\
        --weights path/to/tiny --actors 8 --batch-size 512
    ray job submit -- python pipelines/embed_prompts.py --input s3://... --output s3://... \\
        --gpus-per-actor 0.25
    python pipelines/align.py data.prompts=prompts/ data.embeddings=embeddings/        # training reuses them

Reads the readable Parquet shards of --input (others are skipped with a reason, bad prompt cells are
skipped and counted), encodes them in a pool of --actors encoder actors (each loads the backend once)
and writes embedding shards plus _manifest.json (counts, encoder fingerprint, skipped shards) to
--output. Training refuses embeddings made by a different encoder.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    lines = __doc__.split("\n")
    parser = argparse.ArgumentParser(description=lines[0], epilog="\n".join(lines[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True,
                        help="Parquet prompt shards: file, directory, glob or s3:// prefix")
    parser.add_argument("--output", required=True, help="directory or s3:// prefix for the embedding shards")
    parser.add_argument("--backend", default="tiny", help="registered backend name (default: tiny)")
    parser.add_argument("--weights", default=None,
                        help="backend weights directory (default: the backend's own)")
    parser.add_argument("--column", default="prompt", help="column holding the prompts (default: prompt)")
    parser.add_argument("--actors", type=int, default=2, help="encoder actors (default: 2)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per encoder call (default: 256)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0,
                        help="CPUs reserved per actor (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0,
                        help="GPUs per actor, fractions share a GPU (default: 0, encode on CPU)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the contents of a non-empty --output")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from r2d3.backends import available_backends
    from r2d3.data.prompts import PromptSourceError

    if args.backend not in available_backends():
        sys.exit(f"embed_prompts: unknown backend {args.backend!r}; valid backends: "
                 f"{', '.join(available_backends())}")
    from r2d3.ray.embed import embed_prompts

    try:
        counts = embed_prompts(args.input, args.output, args.backend, args.weights, column=args.column,
                               actors=args.actors, batch_size=args.batch_size,
                               cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
                               overwrite=args.overwrite)
    except (PromptSourceError, ValueError, FileExistsError) as err:
        sys.exit(f"embed_prompts: {err}")
    print(f"\nr2d3 embed_prompts: {counts['rows_in']} rows in, {counts['embedded']} embedded, "
          f"{counts['skipped_rows']} bad rows skipped, {len(counts['skipped_shards'])} shards skipped, "
          f"{counts['seconds']:.1f} s")
    print(f"encoder: {counts['encoder']}")
    for item in counts["skipped_shards"]:
        print(f"skipped shard {item['shard']}: {item['reason']}")
    print(f"outputs: {counts['output']} (manifest: {counts['manifest']})")
    print(json.dumps({k: counts[k] for k in ("rows_in", "embedded", "skipped_rows")}))
    return counts


if __name__ == "__main__":
    main()
