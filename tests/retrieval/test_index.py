"""Faiss index building, exact k-NN, persistence and the index-backed sweeps."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from mltrain.errors import BundleError, ConfigError, DataError
from mltrain.evaluation.metrics import retrieval_metrics
from mltrain.evaluation.sweeps import index_comparison, pca_sweep, shortest_within
from mltrain.retrieval.index import (
    drop_self,
    index_nbytes,
    knn,
    l2_normalize,
    load_index,
    save_index,
    search,
)
from mltrain.retrieval.index_types import (
    INDEX_TYPES,
    build_index,
    check_index_config,
    default_nlist,
    fitted_m,
    fitted_nbits,
    graph_nlist,
)


def random_data(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def clusters(classes: int = 5, per_class: int = 12, dim: int = 16, seed: int = 0):
    """Well separated clusters: class c lives around 3 * e_c."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    centres = 3 * np.eye(dim, dtype=np.float32)[labels]
    return centres + 0.3 * rng.standard_normal((len(labels), dim)).astype(np.float32), labels


def test_l2_normalize_copies_and_keeps_zero_rows():
    x = np.array([[3, 4], [0, 0]], dtype=np.float64)
    out = l2_normalize(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 0]])
    assert x[0, 0] == 3  # input untouched


def test_knn_cosine_vs_l2_scores_by_hand():
    gallery = np.array([[2, 0], [1, 0.5]], dtype=np.float32)
    query = np.array([[1, 0]], dtype=np.float32)
    scores, idx = knn(query, gallery, 2, metric="cosine")
    assert idx.tolist() == [[0, 1]]  # same direction wins under cosine
    np.testing.assert_allclose(scores, [[1.0, 1 / np.sqrt(1.25)]], rtol=1e-6)
    scores, idx = knn(query, gallery, 2, metric="l2")
    assert idx.tolist() == [[1, 0]]  # nearer point wins under L2
    np.testing.assert_allclose(scores, [[0.25, 1.0]], rtol=1e-6)  # squared distances


def test_knn_exclude_self_by_hand():
    x = np.array([[0, 0], [1, 0], [3, 0], [7, 0]], dtype=np.float32)
    _, idx = knn(x, x, 2, metric="l2", exclude_self=True, chunk_size=3)
    assert idx.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1]]


def test_knn_exclude_self_with_exact_duplicates():
    # Four identical rows and k=2: the k+1=3 results of a duplicate can all be *other*
    # duplicates, so the row itself is absent and the last column must go instead.
    x = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)
    for metric in ("cosine", "l2"):
        _, idx = knn(x, x, 2, metric=metric, exclude_self=True)
        assert idx.shape == (5, 2)
        assert not (idx == np.arange(5)[:, None]).any()
        for row in range(4):  # two of the other duplicates are the nearest
            assert set(idx[row]) <= {0, 1, 2, 3} - {row}


def test_drop_self_by_hand():
    scores = np.array([[0.0, 0.1, 0.2], [0.0, 0.1, 0.2], [0.0, 0.0, 0.3]], dtype=np.float32)
    indices = np.array([[11, 10, 12], [10, 12, 11], [13, 14, 15]])
    s, i = drop_self(scores, indices, start=10)
    # Row 0 (id 10) drops position 1, row 1 (id 11) drops position 2, row 2 (id 12) is
    # absent from its results and drops its last column.
    assert i.tolist() == [[11, 12], [10, 12], [13, 14]]
    np.testing.assert_allclose(s, [[0.0, 0.2], [0.0, 0.1], [0.0, 0.0]])


def test_knn_chunking_does_not_change_results():
    x, q = random_data(50), random_data(13, seed=1)
    a = knn(q, x, 5, chunk_size=8192)
    b = knn(q, x, 5, chunk_size=4)
    np.testing.assert_array_equal(a[1], b[1])


def test_knn_bad_k_and_metric_are_config_errors():
    x = random_data(4)
    with pytest.raises(ConfigError, match="k=5 exceeds the gallery size 4"):
        knn(x, x, 5)
    with pytest.raises(ConfigError, match="k=4 exceeds the gallery size 4"):
        knn(x, x, 4, exclude_self=True)
    with pytest.raises(ConfigError, match="unknown metric 'dot'.*cosine, l2"):
        knn(x, x, 1, metric="dot")


def test_default_nlist_by_hand():
    assert default_nlist(10_000) == 256  # 4*sqrt = 400, capped at 10000 // 39
    assert default_nlist(1_000_000) == 4000  # 4 * 1000, well under 25641
    assert default_nlist(100) == 2
    assert default_nlist(10) == 1


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf_flat", "ivf_hnsw", "ivf_pq"])
def test_every_index_type_finds_the_exact_neighbour(kind, metric):
    gallery, queries = random_data(400), random_data(40, seed=1)
    index = build_index(kind, gallery, metric=metric)
    assert index.ntotal == 400
    _, exact = knn(queries, gallery, 1, metric=metric)
    _, got = search(index, queries, 1, metric=metric)
    assert (got[:, 0] == exact[:, 0]).mean() >= 0.8


def test_unknown_index_type_and_bad_args_are_config_errors():
    x = random_data(300)
    with pytest.raises(ConfigError, match="flat, hnsw, ivf_flat, ivf_hnsw, ivf_pq"):
        build_index("annoy", x)
    with pytest.raises(ConfigError, match=r"^index_args: hnsw takes M, ef_construction, "
                       r"ef_search \(got efsearch\)$"):  # fmt: skip
        build_index("hnsw", x, args={"efsearch": 3})
    with pytest.raises(ConfigError, match=r"flat takes no arguments \(got dim\)"):
        build_index("flat", x, args={"dim": 3})  # a builder's own argument is no user's
    with pytest.raises(ConfigError, match="m=5.*dimension 16"):
        build_index("ivf_pq", x, args={"m": 5})
    with pytest.raises(ConfigError, match="nlist=50.*got 20"):
        build_index("ivf_flat", x[:20], args={"nlist": 50})
    with pytest.raises(ConfigError, match="nbits=8 needs at least 256 .*got 100"):
        build_index("ivf_pq", x[:100], args={"nbits": 8})
    with pytest.raises(ConfigError, match="ivf_pq needs at least 160 training vectors .*got 100"):
        build_index("ivf_pq", x[:100])  # unset nbits is fitted, and 100 rows are too few
    assert INDEX_TYPES.names() == ["flat", "hnsw", "ivf_flat", "ivf_hnsw", "ivf_pq"]


@pytest.mark.parametrize("pca_dim", [0, 17])
def test_pca_dim_out_of_range_names_the_value(pca_dim):
    with pytest.raises(ConfigError, match=f"pca_dim={pca_dim} "):
        build_index("flat", random_data(50), pca_dim=pca_dim)


def test_search_checks_metric_against_index():
    index = build_index("flat", random_data(20), metric="l2")
    with pytest.raises(ConfigError, match="metric 'cosine' does not match this L2 index"):
        search(index, random_data(2), 1, metric="cosine")


def test_pca_index_keeps_cosine_and_survives_save_load(tmp_path):
    train, gallery, queries = random_data(200, seed=2), random_data(100), random_data(10, seed=1)
    index = build_index("flat", gallery, pca_dim=6, train_vectors=train)
    assert index.d == 16 and faiss.downcast_index(index).chain.size() == 2
    scores, idx = search(index, queries, 5)
    assert scores.max() <= 1 + 1e-5  # re-normalised after PCA: still a cosine
    self_scores, self_idx = search(index, gallery[:5], 1)
    np.testing.assert_allclose(self_scores[:, 0], 1.0, atol=1e-5)
    assert self_idx[:, 0].tolist() == [0, 1, 2, 3, 4]
    path = tmp_path / "gallery.index"
    save_index(index, path)
    loaded = load_index(path)
    assert isinstance(faiss.downcast_index(loaded), faiss.IndexPreTransform)
    again_scores, again_idx = search(loaded, queries, 5)
    np.testing.assert_array_equal(again_idx, idx)
    np.testing.assert_allclose(again_scores, scores, rtol=1e-6)
    assert index_nbytes(index) == path.stat().st_size


def test_search_params_are_stored_in_the_index(tmp_path):
    x = random_data(300)
    hnsw = build_index("hnsw", x, args={"ef_search": 7})
    ivf = build_index("ivf_flat", x, pca_dim=8, args={"nlist": 4, "nprobe": 3})
    save_index(hnsw, tmp_path / "h.index")
    save_index(ivf, tmp_path / "i.index")
    assert faiss.downcast_index(load_index(tmp_path / "h.index")).hnsw.efSearch == 7
    assert faiss.extract_index_ivf(load_index(tmp_path / "i.index")).nprobe == 3


def test_graph_nlist_by_hand():
    assert graph_nlist(1_000_000) == 8192  # 8 * 1000 = 8000, nearest power of two
    assert graph_nlist(500_000) == 4096  # 8 * 707 = 5657: 2**12.47 rounds to 2**12
    assert graph_nlist(100_000) == 2048  # 8 * 316 = 2530, under 100000 // 39 = 2564
    assert graph_nlist(10_000) == 256  # 8 * 100 = 800 -> 1024, capped at 10000 // 39
    assert graph_nlist(5_000) == 128  # 566 -> 512, capped at 5000 // 39
    assert graph_nlist(100) == 2
    assert graph_nlist(10) == 1


def test_ivf_hnsw_trains_its_graph_by_k_means_and_finds_the_neighbours():
    """k-means fills the empty HNSW quantizer with the list centroids inside `train`; with
    most lists probed the result is near exact."""
    gallery, _ = clusters(classes=16, per_class=250, dim=32)  # 4,000 rows: nlist 102
    queries = gallery[::40] + 0.05 * random_data(100, dim=32, seed=3)
    for codec in ("flat", "fp16", "sq8"):
        index = build_index("ivf_hnsw", gallery, args={"nprobe": 32, "codec": codec})
        ivf = faiss.extract_index_ivf(index)
        graph = faiss.downcast_index(ivf.quantizer)
        assert isinstance(graph, faiss.IndexHNSWFlat) and graph.ntotal == ivf.nlist == 102
        assert ivf.nprobe == 32 and graph.hnsw.efSearch == 32  # raised from 16 to nprobe
        _, exact = knn(queries, gallery, 10)
        _, got = search(index, queries, 10)
        recall = np.mean([len(set(e) & set(g)) / 10 for e, g in zip(exact, got, strict=True)])
        assert recall >= 0.9, (codec, recall)


def test_ivf_hnsw_args_are_checked_by_name():
    x = random_data(400)
    index = faiss.downcast_index(build_index("ivf_hnsw", x))
    assert isinstance(index, faiss.IndexIVFScalarQuantizer)  # fp16 lists by default
    assert (index.nlist, index.nprobe) == (10, 5)  # 400 // 39 lists, nprobe 5
    with pytest.raises(ConfigError, match=r"^index arg codec must be one of flat, fp16, sq8, "
                       r"got 'pq'$"):  # fmt: skip
        build_index("ivf_hnsw", x, args={"codec": "pq"})
    with pytest.raises(ConfigError, match=r"^index arg M must be a positive integer, got 0$"):
        build_index("ivf_hnsw", x, args={"M": 0})
    with pytest.raises(ConfigError, match=r"^index_args: ivf_hnsw takes nlist, nprobe, "
                       r"ef_search, M, codec \(got efSearch\)$"):  # fmt: skip
        build_index("ivf_hnsw", x, args={"efSearch": 8})


def test_ivf_hnsw_keeps_nprobe_and_the_graphs_ef_search_through_save_and_open(tmp_path):
    from mltrain.retrieval.gallery import _apply_search_params

    index = build_index("ivf_hnsw", random_data(800), pca_dim=8,
                        args={"nlist": 8, "nprobe": 3, "ef_search": 24})  # fmt: skip
    save_index(index, tmp_path / "g.index")
    loaded = load_index(tmp_path / "g.index")
    ivf = faiss.extract_index_ivf(loaded)
    graph = faiss.downcast_index(ivf.quantizer)
    assert (ivf.nprobe, graph.hnsw.efSearch, graph.ntotal) == (3, 24, 8)
    _apply_search_params(loaded, {"nprobe": 6, "ef_search": 4})  # a manifest's args
    assert (ivf.nprobe, graph.hnsw.efSearch) == (6, 6)  # efSearch never below nprobe


def test_load_missing_or_corrupt_index_is_bundle_error(tmp_path):
    missing = tmp_path / "nope.index"
    with pytest.raises(BundleError, match="nope.index does not exist"):
        load_index(missing)
    corrupt = tmp_path / "bad.index"
    corrupt.write_bytes(b"not a faiss index at all")
    with pytest.raises(BundleError, match="bad.index is corrupt"):
        load_index(corrupt)


def test_empty_vectors_are_data_errors():
    with pytest.raises(DataError, match="non-empty"):
        build_index("flat", np.zeros((0, 4), dtype=np.float32))


def test_pca_sweep_lengths_and_full_length_baseline():
    train, _ = clusters(seed=1)
    emb, labels = clusters()
    rows = pca_sweep(train, emb, labels, [4, 8, 64])
    assert [r["length"] for r in rows] == [4, 8, 16]  # 64 > dim skipped, full length added
    assert [r["pca"] for r in rows] == [True, True, False]
    full, _ = retrieval_metrics(emb, labels, ks=(1,))
    assert rows[-1]["precision_at_1"] == full["precision_at_1"]
    assert rows[-1]["map_at_r"] == full["map_at_r"]
    # 5 clusters along 5 axes survive a projection to 8 dims untouched.
    assert rows[1]["precision_at_1"] == 1.0 and rows[1]["book_accuracy"] == 1.0
    assert rows[0]["index_bytes"] < rows[1]["index_bytes"] < rows[2]["index_bytes"]
    assert all(r["query_us"] > 0 for r in rows)


def test_shortest_within_by_hand():
    rows = [
        {"length": 4, "precision_at_1": 0.90},
        {"length": 8, "precision_at_1": 0.947},
        {"length": 16, "precision_at_1": 0.95},
    ]
    assert shortest_within(rows)["length"] == 8
    assert shortest_within(rows, tolerance=0.06)["length"] == 4
    assert shortest_within(rows, tolerance=0.0)["length"] == 16


def test_index_comparison_measures_through_each_index():
    emb, labels = clusters(classes=5, per_class=60)  # 300 rows: enough to train ivf_pq
    args = {"ivf_pq": {"m": 4}}
    rows = index_comparison(emb, labels, emb, labels, args=args)
    assert [r["kind"] for r in rows] == ["flat", "hnsw", "ivf_flat", "ivf_pq"]
    flat, _ = retrieval_metrics(emb, labels, ks=(1,))
    assert rows[0]["precision_at_1"] == pytest.approx(flat["precision_at_1"])
    assert rows[0]["map_at_r"] == pytest.approx(flat["map_at_r"])
    assert all(r["precision_at_1"] == 1.0 for r in rows)
    assert all(r["bytes"] > 0 and r["query_us"] > 0 and r["build_seconds"] >= 0 for r in rows)


def test_index_comparison_sees_approximation_loss():
    # Random data, 8 lists, 1 probe: most of each query's class lies in unprobed lists.
    emb, labels = random_data(400), np.repeat(np.arange(4), 100)
    flat, ivf = index_comparison(
        emb,
        labels,
        emb,
        labels,
        kinds=("flat", "ivf_flat"),
        args={"ivf_flat": {"nlist": 8, "nprobe": 1}},
    )
    assert ivf["map_at_r"] < flat["map_at_r"]
    with pytest.raises(ConfigError, match="unknown index type"):
        index_comparison(emb, labels, emb, labels, kinds=("lsh",))


def test_pq_code_size_and_sub_quantizers_fit_the_data():
    assert [fitted_nbits(n) for n in (159, 160, 320, 1500, 2559, 2560, 10**6)] == [
        3, 4, 5, 7, 7, 8, 8,
    ]  # about 10 rows per centroid, at most 256 centroids
    assert (fitted_m(1280), fitted_m(100), fitted_m(7)) == (16, 10, 7)
    index = faiss.downcast_index(build_index("ivf_pq", random_data(400, dim=20)))
    assert (index.pq.nbits, index.pq.M, index.nlist) == (5, 10, 10)


def test_thin_training_is_one_note_not_faiss_warnings(capfd):
    assert check_index_config("ivf_pq", 1500, 64) == (
        "128 PQ centroids per sub-quantizer x 16 trained on 1500 rows (Faiss recommends 39 per "
        "centroid); approximate results may be coarser than on a large gallery"
    )
    assert check_index_config("ivf_flat", 1500, 64) is None  # 155 lists: 39 rows each fit
    build_index("ivf_pq", random_data(1500, dim=64))
    assert "WARNING clustering" not in capfd.readouterr().err
    with pytest.raises(ConfigError, match=r"pca_dim=64 .*min\(embedding length 128, training"):
        check_index_config("flat", 60, 128, pca_dim=64)


def test_a_shorter_pca_cut_from_a_longer_one_equals_training_it():
    """PCA components are nested, so the sweep trains the longest projection once and cuts
    the shorter ones from it; the cut must project exactly as a PCA trained to that length."""
    import gc

    from mltrain.retrieval.index import prepare
    from mltrain.retrieval.index_types import apply_transforms, pca_transforms, shorter_pca

    x = prepare(random_data(200, 32, seed=3), "cosine")
    longest = pca_transforms(x, 16, "cosine")
    cut = shorter_pca(longest, 6, "cosine")
    del longest
    gc.collect()  # the cut owns copies of the mean and components
    trained = pca_transforms(x, 6, "cosine")
    a, b = apply_transforms(cut, x[:20]), apply_transforms(trained, x[:20])
    assert a.shape == (20, 6)
    np.testing.assert_allclose(a, b, atol=1e-6)  # the same eigendecomposition, cut
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)  # re-normalised
    with pytest.raises(ConfigError, match="pca_dim=17 must be between 1 and the trained 16"):
        shorter_pca(pca_transforms(x, 16, "cosine"), 17, "cosine")
