"""Sharded embeddings: writer/reader round trips, one shard mapped at a time, index building."""

from __future__ import annotations

import weakref
from pathlib import Path

import faiss
import numpy as np
import pytest

import mltrain.retrieval.shards as shards_mod
from mltrain.config import load_config
from mltrain.errors import ConfigError, DataError
from mltrain.retrieval.index import prepare, search
from mltrain.retrieval.index_types import build_index, default_nlist, graph_nlist
from mltrain.retrieval.shards import (
    ShardReader,
    ShardWriter,
    index_from_shards,
    shard_name,
    shard_number,
    training_rows,
)


def hand_rows(n: int, dim: int = 3) -> np.ndarray:
    """Row i is [dim*i, dim*i + 1, ...]: every value says where it came from."""
    return np.arange(n * dim, dtype=np.float32).reshape(n, dim)


def write(folder: Path, x: np.ndarray, shard_rows: int, batch: int, **kw) -> ShardReader:
    w = ShardWriter(folder, len(x), shard_rows, **kw)
    for start in range(0, len(x), batch):
        w.write(x[start : start + batch])
    return ShardReader([folder / s.name for s in w.close()])


def test_writer_splits_batches_across_shards_and_the_reader_reads_them_back(tmp_path):
    x = hand_rows(10)
    w = ShardWriter(tmp_path, total=10, shard_rows=4)
    for start in range(0, 10, 3):  # batches of 3 straddle the shard boundaries at 4 and 8
        w.write(x[start : start + 3])
    written = w.close()
    assert [(s.name, s.rows) for s in written] == [
        ("embeddings-00000.npy", 4), ("embeddings-00001.npy", 4), ("embeddings-00002.npy", 2)
    ]  # fmt: skip
    last = np.load(tmp_path / "embeddings-00002.npy", allow_pickle=False)
    assert last.tolist() == [[24, 25, 26], [27, 28, 29]]  # rows 8 and 9
    assert np.load(tmp_path / "embeddings-00001.npy")[0].tolist() == [12, 13, 14]  # row 4

    r = ShardReader([tmp_path / s.name for s in written])
    assert r.shape == (10, 3) and len(r) == 10 and r.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(r), x)
    assert r[3].tolist() == [9, 10, 11] and r[-1].tolist() == [27, 28, 29]
    np.testing.assert_array_equal(r[2:9:3], x[[2, 5, 8]])
    np.testing.assert_array_equal(r[[9, 0, 4, 3]], x[[9, 0, 4, 3]])
    assert r.sample(4).tolist() == x[[0, 3, 6, 9]].tolist()  # evenly spread
    np.testing.assert_array_equal(r.sample(100), x)  # all rows when asked for more
    with pytest.raises(IndexError):
        r[10]


def test_chunks_are_memmap_views_within_one_shard(tmp_path):
    r = write(tmp_path, hand_rows(10), shard_rows=4, batch=10)
    got = [(start, type(c), len(c)) for start, c in r.chunks(3)]
    assert got == [(0, np.memmap, 3), (3, np.memmap, 1), (4, np.memmap, 3), (7, np.memmap, 1),
                   (8, np.memmap, 2)]  # fmt: skip


def test_float16_shards_numbered_from_first(tmp_path):
    r = write(tmp_path, hand_rows(5), shard_rows=2, batch=5, dtype="float16", first=7)
    assert [p.name for p in r.paths] == [shard_name(7), shard_name(8), shard_name(9)]
    assert shard_number("embeddings-00009.npy") == 9
    assert r.dtype == np.float16 and np.asarray(r).tolist() == hand_rows(5).tolist()


def test_writer_refuses_wrong_row_counts_dims_and_existing_files(tmp_path):
    with pytest.raises(ConfigError, match="shard size"):
        ShardWriter(tmp_path, 10, 0)
    w = ShardWriter(tmp_path / "a", 4, 2)
    (tmp_path / "a").mkdir()
    with pytest.raises(DataError, match="5 rows written, more than the 4 announced"):
        w.write(hand_rows(5))
    w.write(hand_rows(3))
    with pytest.raises(DataError, match="dimension 4, earlier rows had 3"):
        w.write(hand_rows(1, dim=4))
    with pytest.raises(DataError, match="expected 4 rows for the shards, got 3"):
        w.close()
    with pytest.raises(DataError, match="already exists"):
        ShardWriter(tmp_path / "a", 2, 2).write(hand_rows(2))
    with pytest.raises(DataError, match="not a shard file name"):
        shard_number("../embeddings-00001.npy")


@pytest.fixture
def mapped(monkeypatch) -> list[int]:
    """Tracks every shard the module maps; each new map asserts that no earlier one is alive.

    That is the memory bound, checked without timing or RSS: at most one shard's pages can
    be in this process at a time. Returns the rows of each map, in order.
    """
    alive: list[weakref.ref] = []
    rows: list[int] = []

    def track(opener):
        def opened(*args, **kwargs):
            still = [r() for r in alive if r() is not None]
            assert not still, f"{len(still)} earlier shard map(s) still alive"
            m = opener(*args, **kwargs)
            assert isinstance(m, np.memmap)
            alive.append(weakref.ref(m))
            rows.append(len(m))
            return m

        return opened

    monkeypatch.setattr(shards_mod, "open_memmap", track(shards_mod.open_memmap))
    monkeypatch.setattr(shards_mod, "open_shard", track(shards_mod.open_shard))
    return rows


def test_streaming_many_batches_maps_one_shard_at_a_time(tmp_path, mapped):
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((7, 8), dtype=np.float32) for _ in range(50)]
    w = ShardWriter(tmp_path, total=350, shard_rows=40)
    for b in batches:
        w.write(b)
    names = [s.name for s in w.close()]
    assert mapped == [40] * 8 + [30]  # nine shards written, one mapped at a time
    mapped.clear()

    r = ShardReader([tmp_path / n for n in names])
    seen = []
    for start, chunk in r.chunks(16):
        assert isinstance(chunk, np.memmap) and len(chunk) <= 16
        seen.append((start, np.array(chunk)))
        del chunk  # the loop variable would keep the last view (and its shard) alive
    assert len(mapped) == 2 * 9  # headers at construction, then each shard once
    np.testing.assert_array_equal(np.concatenate([c for _, c in seen]), np.concatenate(batches))
    mapped.clear()
    sample = r.sample(35)
    assert sample.shape == (35, 8) and len(mapped) == 9  # each shard mapped once, in turn
    mapped.clear()
    index = index_from_shards("flat", r, "l2", chunk_rows=16)
    assert index.ntotal == 350 and len(mapped) == 9  # nothing to train: the adds alone
    mapped.clear()
    index = index_from_shards("flat", r, "l2", pca_dim=4, chunk_rows=16)
    assert index.ntotal == 350 and len(mapped) == 2 * 9  # a sample for the PCA, then the adds


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("pca_dim", [None, 4])
def test_index_from_shards_equals_build_index_for_exact_search(tmp_path, metric, pca_dim):
    x = np.random.default_rng(1).standard_normal((300, 8), dtype=np.float32)
    r = write(tmp_path, x, shard_rows=64, batch=50)
    whole = build_index("flat", x, metric, pca_dim)
    sharded = index_from_shards("flat", r, metric, pca_dim, chunk_rows=20)
    s1, i1 = search(whole, x[:40], 5, metric)
    s2, i2 = search(sharded, x[:40], 5, metric)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-5, atol=1e-5)


def test_ivf_from_shards_sizes_nlist_for_the_whole_gallery(tmp_path):
    x = np.random.default_rng(2).standard_normal((2000, 8), dtype=np.float32)
    r = write(tmp_path, x, shard_rows=500, batch=300)
    index = index_from_shards("ivf_flat", r, "cosine", args={"nprobe": 4})
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist == default_nlist(2000) and index.ntotal == 2000
    scores, rows = index.search(prepare(x[:5], "cosine"), 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]  # each row finds itself
    with pytest.raises(ConfigError, match="nlist must be a positive integer"):
        index_from_shards("ivf_flat", r, args={"nlist": "many"})


def test_ivf_hnsw_from_shards_sizes_its_lists_by_its_own_rule(tmp_path):
    x = np.random.default_rng(3).standard_normal((2000, 8), dtype=np.float32)
    r = write(tmp_path, x, shard_rows=500, batch=300)
    index = index_from_shards("ivf_hnsw", r, "cosine", args={"nprobe": 8})
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nlist == graph_nlist(2000) == 51 and index.ntotal == 2000  # 2000 // 39
    assert faiss.downcast_index(ivf.quantizer).ntotal == 51  # trained on the sample
    _, rows = index.search(prepare(x[:5], "cosine"), 1)
    assert rows[:, 0].tolist() == [0, 1, 2, 3, 4]


def test_training_sample_is_bounded_by_what_faiss_would_use():
    assert training_rows(50, None) == 50  # small galleries train on everything
    assert training_rows(10_000_000, None) == 100_000
    assert training_rows(10_000_000, 1000) == 256_000  # 256 points per list
    assert training_rows(1_000_000, 4000) == 1_000_000


def test_export_shard_size_is_a_strict_positive_integer():
    assert load_config().export.shard_size == 1_000_000
    assert load_config(None, ["export.shard_size=5000"]).export.shard_size == 5000
    for bad, match in [("0", "export.shard_size: must be at least 1"),
                       ("true", "export.shard_size: expected an integer"),
                       ("'1000'", "export.shard_size: expected int")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"export.shard_size={bad}"])
