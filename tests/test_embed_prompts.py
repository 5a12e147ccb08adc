"""Precomputed prompt embeddings: the Parquet format, the cache training reads, the Ray Data pipeline."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from r2d3.backends import TinySplatBackend, load_backend
from r2d3.config import build_config
from r2d3.train.config import AlignConfig
from r2d3.data.embeddings import (EmbeddingCache, EmbeddingMismatchError, encode_batch, encode_table,
                                  encoder_fingerprint, load_embedding_cache)
from r2d3.data.procedural import VOCABULARY, split_prompts
from r2d3.data.prompts import PromptSourceError

ROOT = Path(__file__).resolve().parents[1]

# 1 to 12 words (lengths 2 to 13 with BOS), some with out-of-vocabulary words
PROMPTS = ["cube", "a red cube", "a blue sphere", "a zorblax", "a small green cone with stripes",
           "a tall white cylinder and a purple torus with yellow stripes, big and wide",
           *split_prompts("train")[:30:3]]
UNKNOWN = ["a never seen before prompt with many extra unknown words in it", "sphere", "a red unknownium"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "w"
    TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def backend(weights):
    return load_backend("tiny", weights=str(weights))


def write_embeddings(backend, root: Path, batches: list[list]) -> Path:
    """One shard per batch, so rows were encoded next to different neighbours (different padding)."""
    root.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(batches):
        pq.write_table(encode_table(backend, batch), root / f"part-{i:03d}.parquet")
    return root


def assert_same(got, want):
    """Same shape, dtype, mask and zero padding; features equal up to float rounding (the encoder's own
    output for a prompt moves in the last bits with its batch's padded length, measured <= 5e-7)."""
    assert got.tokens.shape == want.tokens.shape and got.tokens.dtype == want.tokens.dtype
    assert got.tokens.device == want.tokens.device
    assert torch.equal(got.mask, want.mask)
    assert not got.tokens[~got.mask].any() and not want.tokens[~want.mask].any()
    torch.testing.assert_close(got.tokens, want.tokens, rtol=0, atol=2e-6)


def test_cache_returns_exactly_the_backends_embeddings_for_mixed_lengths(backend, tmp_path):
    # rows encoded in batches of three (padded to each batch's longest), looked up in other combinations
    root = write_embeddings(backend, tmp_path / "emb", [PROMPTS[i: i + 3] for i in range(0, len(PROMPTS), 3)])
    cache = load_embedding_cache(str(root), backend)
    assert len(cache) == len(PROMPTS) and cache.fingerprint == encoder_fingerprint(backend)
    for query in [PROMPTS, PROMPTS[::-1], ["cube"], ["cube", "a red cube"], PROMPTS[5:6] + PROMPTS[:2] * 2]:
        assert_same(cache.encode(query), backend.encode_prompts(query))
    assert cache.misses == 0 and cache.hits == 2 * len(PROMPTS) + 1 + 2 + 5
    lengths = backend.encode_prompts(PROMPTS).mask.sum(1)
    assert len(set(lengths.tolist())) >= 5  # the rows really have mixed lengths


def test_misses_fall_back_to_the_encoder_and_are_counted(backend, tmp_path):
    cache = load_embedding_cache(str(write_embeddings(backend, tmp_path / "emb", [PROMPTS])), backend)
    queries = [(UNKNOWN[:1] + PROMPTS[:3], 1), (PROMPTS[:2] + UNKNOWN[1:], 2), (UNKNOWN, 3), ([""], 1)]
    for query, misses in queries:
        before = cache.misses
        assert_same(cache.encode(query), backend.encode_prompts(query))
        assert cache.misses - before == misses
    assert cache.hits == 5


def test_fingerprint_mismatch_names_both_encoders(backend, weights, tmp_path):
    root = write_embeddings(backend, tmp_path / "emb", [PROMPTS])
    other = TinySplatBackend.random_init(num_gaussians=24, dim=16, vocab=VOCABULARY, seed=1)
    mine, theirs = encoder_fingerprint(backend), encoder_fingerprint(other)
    assert mine != theirs and mine.startswith("tiny:")
    with pytest.raises(EmbeddingMismatchError) as err:
        load_embedding_cache(str(root), other)
    assert mine in str(err.value) and theirs in str(err.value)
    # the same weights loaded from another directory are the same encoder
    shutil.copytree(weights, tmp_path / "copy")
    assert encoder_fingerprint(load_backend("tiny", weights=str(tmp_path / "copy"))) == mine


def test_bad_rows_and_bad_shards_are_skipped_and_counted(backend, tmp_path):
    cells = ["a red cube", None, "   ", 3, "  a blue sphere ", ""]
    columns = encode_batch(backend, cells)
    assert columns["prompt"].to_pylist() == ["a red cube", "a blue sphere"]
    assert len(cells) - len(columns["prompt"]) == 4
    assert columns["length"].to_pylist() == [4, 4] and columns["dim"].to_pylist() == [16, 16]
    assert len(encode_batch(backend, [None, " "])["prompt"]) == 0
    root = write_embeddings(backend, tmp_path / "emb", [cells, [None]])
    pq.write_table(pa.table({"prompt": ["a red cube"]}), root / "raw-prompts.parquet")  # not embeddings
    (root / "corrupt.parquet").write_bytes(b"PAR1 not parquet")
    cache = load_embedding_cache(str(root), backend)
    assert sorted(cache.index) == ["a blue sphere", "a red cube"]
    reasons = {Path(s).name: r for s, r in cache.skipped_shards}
    assert "not an embeddings shard" in reasons["raw-prompts.parquet"]
    assert "unreadable" in reasons["corrupt.parquet"]
    with pytest.raises(PromptSourceError, match="no prompt embeddings"):
        load_embedding_cache(str(root / "raw-prompts.parquet"), backend)


def test_training_with_cached_embeddings_matches_the_encoder(weights, tmp_path):
    from r2d3.train.loop import run
    from r2d3.train.session import LocalSession

    prompts = ["a red cube", "a blue sphere", "a small green cone", "a tall yellow torus with stripes"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    write_embeddings(load_backend("tiny", weights=str(weights)), tmp_path / "emb", [prompts[:1], prompts[1:]])

    def config(*extra) -> AlignConfig:
        return build_config(AlignConfig, overrides=[
            f"model.weights={weights}", f"data.prompts={tmp_path / 'prompts.txt'}", "reward=colorfulness",
            "train.epochs=1", "train.sample_batch_size=4", "train.train_batch_size=2", "sampler.num_steps=4",
            "render.num_views=2", "render.resolution=16", "model.lora_rank=2", "run.progress=false", *extra])

    plain = run(config(), LocalSession(tmp_path / "plain"))
    cached = run(config(f"data.embeddings={tmp_path / 'emb'}"), LocalSession(tmp_path / "cached"))
    # equal here; approx because cached features may differ from a fresh encode in the last bit
    assert cached["history"][0]["reward_mean"] == pytest.approx(plain["history"][0]["reward_mean"], rel=1e-5)
    assert cached["history"][0]["reward_std"] == pytest.approx(plain["history"][0]["reward_std"], rel=1e-4)
    cache = cached["worker"].ctx.backend.encode_prompts.__self__
    assert isinstance(cache, EmbeddingCache)
    assert cache.hits == 4 and cache.misses == 1  # the sampled prompts; the unconditional "" is not cached


def test_cli_help_and_refuses_to_overwrite_its_input(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "embed_prompts.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--input", "--output", "--backend", "--weights", "--column", "--actors", "--batch-size",
                 "--gpus-per-actor"):
        assert flag in proc.stdout
    sys.path.insert(0, str(ROOT / "pipelines"))
    import embed_prompts

    with pytest.raises(SystemExit, match="overlaps the input"):
        embed_prompts.main(["--input", str(tmp_path), "--output", str(tmp_path / "emb")])
    with pytest.raises(SystemExit, match="unknown backend 'nope'"):
        embed_prompts.main(["--input", str(tmp_path), "--output", str(tmp_path / "emb"), "--backend", "nope"])


def write_prompt_shards(root: Path) -> dict[str, list]:
    shards = {
        "shard-000.parquet": ["a red cube", "a blue sphere", "a green cone", "a small yellow torus"],
        "shard-001.parquet": ["a tall white cylinder", None, "   ", "a purple cube", "a red cube"],
        "shard-002.parquet": [f"a {c} sphere" for c in ("red", "green", "blue", "white", "black", "orange")],
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in shards.items():
        pq.write_table(pa.table({"prompt": pa.array(rows, pa.string())}), root / name)
    (root / "shard-003.parquet").write_bytes(b"PAR1 this is not parquet")
    return shards


@pytest.mark.slow
def test_ray_pipeline_embeds_s3_shards_to_s3_and_training_reads_them(tmp_path, ray_local, s3_server, weights,
                                                                     backend):
    import boto3
    import pyarrow.fs as pafs
    import ray.data

    from r2d3.ray.embed import embed_prompts

    ray.data.DataContext.get_current().enable_progress_bars = False
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="r2d3-embed")
    shards = write_prompt_shards(tmp_path / "prompts")
    s3 = pafs.FileSystem.from_uri("s3://r2d3-embed")[0]
    pafs.copy_files(str(tmp_path / "prompts"), "r2d3-embed/prompts", destination_filesystem=s3)

    counts = embed_prompts("s3://r2d3-embed/prompts", "s3://r2d3-embed/emb", "tiny", str(weights), actors=2,
                           batch_size=3, cpus_per_actor=0.5)
    assert counts["rows_in"] == 15 and counts["embedded"] == 13 and counts["skipped_rows"] == 2
    assert [Path(s["shard"]).name for s in counts["skipped_shards"]] == ["shard-003.parquet"]
    assert counts["encoder"] == encoder_fingerprint(backend)
    assert counts["shards_written"] >= 2  # the small input was split into blocks for both actors
    with s3.open_input_stream("r2d3-embed/emb/_manifest.json") as f:
        manifest = json.loads(f.read())
    assert {k: manifest[k] for k in ("rows_in", "embedded", "skipped_rows", "encoder")} == {
        k: counts[k] for k in ("rows_in", "embedded", "skipped_rows", "encoder")}
    with pytest.raises(FileExistsError, match="not empty"):
        embed_prompts("s3://r2d3-embed/prompts", "s3://r2d3-embed/emb", "tiny", str(weights))

    cache = load_embedding_cache("s3://r2d3-embed/emb", backend)
    good = sorted({p for rows in shards.values() for p in rows if p and p.strip()})
    assert sorted(cache.index) == good
    assert_same(cache.encode(good), backend.encode_prompts(good))
    assert cache.misses == 0
