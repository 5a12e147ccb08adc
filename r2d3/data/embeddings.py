"""Precomputed prompt embeddings: the Parquet format ``pipelines/embed_prompts.py`` writes and the
cache training reads instead of running the frozen text encoder on every sampling batch.

One row per prompt:

    prompt   string           the cleaned prompt (stripped, as training reads it)
    tokens   list<float32>    the row's ``[length, dim]`` token features, flattened row-major
    mask     list<bool>       ``[length]``, True on real tokens
    length   int32            L: positions kept for this prompt (see below)
    dim      int32            D: feature size
    encoder  string           fingerprint of the encoder that made the row (:func:`encoder_fingerprint`)

Rows are stored without the batch padding they were encoded with: trailing positions that are
masked *and* all zero are dropped, which is exactly what :meth:`PromptEmbeds.cat` adds back when it
pads to the longest row. A batch assembled from the cache is therefore the batch the backend would
have produced: the same shape, mask and zero padding, and the same features up to float rounding
for a masked-attention encoder (whose real-token features do not depend on the rest of the batch
mathematically; numerically the tiny encoder's output for a prompt moves by <= 5e-7 with the padded
length of its batch, so no cache can be bit-identical to every batch). Encoders that pad with
non-zero features (fixed-length CLIP-style ones) keep every position.

The fingerprint is the backend name plus a hash of the text encoder's configuration and weights, so
embeddings made by another encoder are refused with an error naming both fingerprints.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from r2d3.data.prompts import PromptSourceError, _row_problem, check_shards
from r2d3.storage import filesystem
from r2d3.text import PromptEmbeds, module_fingerprint

log = logging.getLogger(__name__)

#: the columns of an embeddings shard, in order (see the module docstring)
COLUMNS = ("prompt", "tokens", "mask", "length", "dim", "encoder")
MANIFEST = "_manifest.json"


class EmbeddingMismatchError(ValueError):
    """Embeddings made by a different text encoder than the one training uses."""


def embedding_schema():
    import pyarrow as pa

    return pa.schema([("prompt", pa.string()), ("tokens", pa.list_(pa.float32())),
                      ("mask", pa.list_(pa.bool_())), ("length", pa.int32()), ("dim", pa.int32()),
                      ("encoder", pa.string())])


def encoder_fingerprint(backend: Any) -> str:
    """``<backend name>:<sha256 prefix>`` of the text encoder's config and weights.

    A backend may define ``encoder_fingerprint()`` itself (an encoder that is not one module); else
    its ``text_encoder`` module is hashed (:func:`r2d3.text.module_fingerprint`)."""
    own = getattr(backend, "encoder_fingerprint", None)
    if callable(own):
        return f"{backend.name}:{own()}"
    module = getattr(backend, "text_encoder", None)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"backend {backend.name!r} has no text_encoder module and no encoder_fingerprint(); "
                        "precomputed embeddings need one to tell encoders apart")
    return f"{backend.name}:{module_fingerprint(module)}"


def _kept_lengths(embeds: PromptEmbeds) -> torch.Tensor:
    """Per row, the positions up to the last one that is real or has non-zero features (>= 1)."""
    keep = embeds.mask.bool() | (embeds.tokens != 0).any(-1)
    total = keep.shape[1]
    last_from_end = keep.flip(1).int().argmax(1)  # 0 when the last position is kept
    lengths = torch.where(keep.any(1), total - last_from_end, torch.zeros_like(last_from_end))
    return lengths.clamp(min=1)


def encode_batch(backend: Any, prompts: Sequence[object], fingerprint: str | None = None) -> dict[str, Any]:
    """Embedding columns (pyarrow arrays, :data:`COLUMNS`) for the usable prompts among ``prompts``.

    Bad cells (missing, non-string, blank: the rules of :func:`r2d3.data.prompts.load_prompts`) are
    skipped; ``len(prompts) - len(columns["prompt"])`` is their number. Good prompts are stripped and
    encoded in one ``backend.encode_prompts`` call. ``fingerprint`` saves re-hashing the encoder per
    batch (default: :func:`encoder_fingerprint`)."""
    import numpy as np
    import pyarrow as pa

    schema = embedding_schema()
    good, problems = [], []
    for row, value in enumerate(prompts):
        problem = _row_problem(value)
        if problem:
            problems.append((row, problem))
        else:
            good.append(value.strip())
    if problems:
        log.warning("skipped %d bad prompt rows of %d (first: row %d, %s)", len(problems), len(prompts),
                    *problems[0])
    if not good:
        return {f.name: pa.array([], f.type) for f in schema}
    fingerprint = fingerprint or encoder_fingerprint(backend)
    embeds = backend.encode_prompts(good)
    tokens = embeds.tokens.detach().float().cpu()
    mask = embeds.mask.detach().bool().cpu()
    lengths = _kept_lengths(PromptEmbeds(tokens, mask))
    dim = tokens.shape[-1]
    keep = torch.arange(tokens.shape[1])[None] < lengths[:, None]  # [B, L]: row-major order matches the lists
    mask_offsets = np.zeros(len(good) + 1, dtype=np.int64)
    mask_offsets[1:] = np.cumsum(lengths.numpy())
    token_values = pa.array(tokens[keep].reshape(-1).numpy(), pa.float32())
    mask_values = pa.array(mask[keep].numpy(), pa.bool_())
    return {
        "prompt": pa.array(good, pa.string()),
        "tokens": pa.ListArray.from_arrays(pa.array(mask_offsets * dim, pa.int32()), token_values),
        "mask": pa.ListArray.from_arrays(pa.array(mask_offsets, pa.int32()), mask_values),
        "length": pa.array(lengths.numpy().astype(np.int32), pa.int32()),
        "dim": pa.array(np.full(len(good), dim, dtype=np.int32), pa.int32()),
        "encoder": pa.array([fingerprint] * len(good), pa.string()),
    }


def encode_table(backend: Any, prompts: Sequence[object], fingerprint: str | None = None):
    """:func:`encode_batch` as a ``pyarrow.Table`` with the embeddings schema."""
    import pyarrow as pa

    return pa.table(encode_batch(backend, prompts, fingerprint), schema=embedding_schema())


def parquet_row_count(files: Sequence[str]) -> int:
    """Rows in Parquet files (local paths or URIs), from their footers only."""
    import pyarrow.parquet as pq

    total = 0
    for uri in files:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


@dataclass
class EmbeddingsSummary:
    files: list[str]
    rows: int
    encoders: dict[str, int]  # fingerprint -> rows


def summarize_embeddings(source: str) -> EmbeddingsSummary:
    """Rows per encoder fingerprint in an embeddings directory (reads only the footers and the small,
    dictionary-encoded ``encoder`` column); an empty summary when it holds no shard."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        shards = check_shards(source, "prompt")
    except PromptSourceError:
        return EmbeddingsSummary([], 0, {})
    counts: dict[str, int] = {}
    rows = 0
    for uri in shards.files:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as f:
            column = pq.read_table(f, columns=["encoder"]).column("encoder")
        rows += len(column)
        for item in pc.value_counts(column).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return EmbeddingsSummary(shards.files, rows, counts)


def write_manifest(output: str, manifest: dict[str, Any]) -> str:
    """``output/_manifest.json`` (local or s3://); returns its location."""
    fs, path = filesystem(output)
    target = f"{path.rstrip('/')}/{MANIFEST}"
    if "://" not in output:  # object stores have no directories to create
        fs.create_dir(path.rstrip("/"), recursive=True)
    with fs.open_output_stream(target) as f:
        f.write((json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return f"{output.rstrip('/')}/{MANIFEST}"


@dataclass
class EmbeddingCache:
    """Precomputed embeddings by prompt; :meth:`encode` is a drop-in ``backend.encode_prompts``.

    Known prompts come from the cache, unknown ones from the backend's own encoder (counted in
    :attr:`misses`), and the batch is padded as :meth:`PromptEmbeds.cat` pads. Build it with
    :func:`load_embedding_cache`."""

    source: str
    fingerprint: str
    index: dict[str, int]  # prompt -> row
    tokens: torch.Tensor  # [positions, D], every row's positions back to back
    mask: torch.Tensor  # [positions] bool
    starts: torch.Tensor  # [rows] first position of each row
    lengths: torch.Tensor  # [rows]
    fallback: Any  # the backend's original encode_prompts
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    skipped_shards: list[tuple[str, str]] = field(default_factory=list)
    hits: int = 0
    misses: int = 0
    _warned: bool = False

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self.index

    def row(self, prompt: str) -> PromptEmbeds:
        """One cached prompt as ``[1, L, D]`` (CPU, float32)."""
        i = self.index[prompt]
        s, n = int(self.starts[i]), int(self.lengths[i])
        return PromptEmbeds(self.tokens[s: s + n][None], self.mask[s: s + n][None])

    def encode(self, prompts: Sequence[str]) -> PromptEmbeds:
        prompts = list(prompts)
        rows = [self.index.get(p) for p in prompts]
        missing = [p for p, r in zip(prompts, rows) if r is None]
        self.hits += len(prompts) - len(missing)
        self.misses += len(missing)
        if not self._warned and any(p.strip() for p in missing):  # "" (unconditional) is never cached
            self._warned = True
            first = next(p for p in missing if p.strip())
            log.warning("prompt %r is not in the embeddings at %s: encoding it with the backend (further "
                        "misses are counted, not logged)", first[:80], self.source)
        if not prompts or len(missing) == len(prompts):
            return self.fallback(prompts)
        fresh = self.fallback(missing) if missing else None
        fresh_tokens = fresh.tokens.detach().cpu() if fresh is not None else None
        fresh_mask = fresh.mask.detach().cpu() if fresh is not None else None
        lengths = [int(self.lengths[r]) if r is not None else fresh_tokens.shape[1] for r in rows]
        length = max(lengths)
        tokens = torch.zeros(len(prompts), length, self.tokens.shape[1], dtype=self.tokens.dtype)
        mask = torch.zeros(len(prompts), length, dtype=torch.bool)
        j = 0
        for i, (r, n) in enumerate(zip(rows, lengths)):
            if r is None:
                tokens[i, :n] = fresh_tokens[j].to(tokens.dtype)
                mask[i, :n] = fresh_mask[j]
                j += 1
            else:
                s = int(self.starts[r])
                tokens[i, :n] = self.tokens[s: s + n]
                mask[i, :n] = self.mask[s: s + n]
        return PromptEmbeds(tokens.to(device=self.device, dtype=self.dtype), mask.to(self.device))


def _check_table(table) -> str | None:
    """Why an embeddings shard is malformed, or None."""
    import pyarrow.compute as pc

    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        return (f"not an embeddings shard: no {', '.join(missing)} column "
                "(written by pipelines/embed_prompts.py?)")
    if any(table.column(c).null_count for c in COLUMNS):
        return "null cells"
    if not len(table):
        return None
    n, d = table.column("length"), table.column("dim")
    if not pc.all(pc.equal(pc.list_value_length(table.column("mask")), n)).as_py():
        return "mask lengths differ from the length column"
    if not pc.all(pc.equal(pc.list_value_length(table.column("tokens")), pc.multiply(n, d))).as_py():
        return "tokens lengths differ from length * dim"
    return None


def load_embedding_cache(source: str, backend: Any) -> EmbeddingCache:
    """Read every embeddings shard under ``source`` (directory, glob or ``s3://`` prefix) for ``backend``.

    Shards that are unreadable, lack the embedding columns or are malformed are skipped with a reason
    (as prompt shards are); rows written by another encoder raise :class:`EmbeddingMismatchError`
    naming both fingerprints. One cached prompt is re-encoded to find the backend's device and dtype
    and to check that its encoder still reproduces the stored features."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    expected = encoder_fingerprint(backend)
    shards = check_shards(source, "prompt")
    skipped = list(shards.skipped)
    index: dict[str, int] = {}
    tokens, masks, lengths, dim, rows = [], [], [], None, 0
    for uri in shards.files:
        try:
            fs, path = filesystem(uri)
            with fs.open_input_file(path) as f:
                table = pq.read_table(f)
        except Exception as err:  # a shard that lists but does not read: skip it as check_shards does
            skipped.append((uri, f"unreadable: {err}"))
            continue
        problem = _check_table(table)
        if problem:
            skipped.append((uri, problem))
            continue
        if not len(table):
            continue
        found = set(pc.unique(table.column("encoder")).to_pylist())
        if found != {expected}:
            other = sorted(found - {expected})[0]
            raise EmbeddingMismatchError(
                f"the embeddings in {uri} were made by encoder {other}, but training uses encoder {expected} "
                f"(backend {backend.name!r}); re-run pipelines/embed_prompts.py with this backend's "
                "--backend and --weights, or unset data.embeddings")
        dims = set(pc.unique(table.column("dim")).to_pylist())
        dim = min(dims) if dim is None else dim
        if dims != {dim}:
            raise EmbeddingMismatchError(f"the embeddings in {uri} have feature sizes {sorted(dims)}, "
                                         f"others in {source} have {dim}")
        for offset, prompt in enumerate(table.column("prompt").to_pylist()):
            index.setdefault(prompt, rows + offset)  # duplicates: the first copy (same encoder, features)
        rows += len(table)
        lengths.append(table.column("length").to_numpy().astype(np.int64))
        tokens.append(pc.list_flatten(table.column("tokens")).to_numpy().astype(np.float32, copy=False))
        masks.append(pc.list_flatten(table.column("mask")).to_numpy(zero_copy_only=False).astype(bool))
    for shard, reason in skipped[len(shards.skipped):]:
        log.warning("skipped embeddings shard %s: %s", shard, reason)
    if not index:
        first = f"; first skipped: {skipped[0][0]}: {skipped[0][1]}" if skipped else ""
        raise PromptSourceError(f"no prompt embeddings in {source} ({len(skipped)} shards skipped{first})")
    length = torch.from_numpy(np.concatenate(lengths))
    starts = torch.zeros_like(length)
    starts[1:] = torch.cumsum(length, 0)[:-1]
    cache = EmbeddingCache(
        source=source, fingerprint=expected, index=index,
        tokens=torch.from_numpy(np.concatenate(tokens)).reshape(-1, dim),
        mask=torch.from_numpy(np.concatenate(masks)), starts=starts, lengths=length,
        fallback=backend.encode_prompts, skipped_shards=skipped)
    probe_prompt = next(iter(index))
    probe = backend.encode_prompts([probe_prompt])
    cache.device, cache.dtype = probe.tokens.device, probe.tokens.dtype
    stored = cache.row(probe_prompt)
    n = stored.tokens.shape[1]
    fresh = probe.tokens.detach().float().cpu()
    if fresh.shape[-1] != dim or fresh.shape[1] < n or not torch.allclose(fresh[:, :n], stored.tokens,
                                                                           rtol=1e-3, atol=1e-4):
        raise EmbeddingMismatchError(
            f"the embeddings in {source} carry this encoder's fingerprint {expected} but do not match its "
            f"output for {probe_prompt!r} (the encoder code changed?); re-run pipelines/embed_prompts.py")
    log.info("%d cached prompt embeddings from %s (encoder %s)", len(cache), source, expected)
    return cache
