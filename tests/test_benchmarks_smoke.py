"""Smoke tests of the benchmark scripts on tiny generated images with a small random model:
each prints its table with the expected rows and sane numbers (seconds, not minutes)."""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import embed, memory, serve_load, train

TINY_MODEL = ["--pretrained", "false", "--image-size", "32"]


@pytest.fixture(autouse=True)
def _private_cache_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("MLTRAIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust timing on a busy machine; the figures are not checked
    yield
    torch.set_num_threads(threads)


def table(out: str, first_header: str) -> dict[str, list[str]]:
    """The markdown table whose first header cell is `first_header`: {first cell: cells}."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("|") and line.strip("| ").split(" |")[0].strip()
                 == first_header)
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def test_embed_table_has_every_variant_and_the_accuracy_check(make_image_folder, tmp_path,
                                                              capsys):
    root = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=(48, 40))
    result = embed.main(["--root", str(root), "--images", "0", "--batch", "8", *TINY_MODEL])
    out = capsys.readouterr().out
    rows = table(out, "variant")
    labels = list(rows)
    assert len(labels) == 9
    for prefix in ("(a) naive", "(b) project", "(c) project", "(e) project", "(f) model in",
                   "(g) as (f)",
                   "(d) decode only, naive",
                   "(d) decode only, project loader", "(d) decode only, project pipeline"):
        assert sum(label.startswith(prefix) for label in labels) == 1, prefix
    for label, (images, seconds, img_s, ratio, cpu_ms) in rows.items():
        assert int(images) == 24, label  # every variant saw every image
        assert number(seconds) > 0 and number(img_s) > 0 and number(ratio) > 0, label
        assert number(cpu_ms) > 0, label
    assert number(rows[labels[0]][3]) == 1.0  # the naive loop is the baseline
    assert math.isclose(number(rows[labels[1]][3]),
                        result["rate"]["bf16"] / result["rate"]["naive"], rel_tol=0.01)
    # bf16 and fp32 project paths embed the same images with the same weights
    assert 0.9 < result["cos"] <= 1.0001
    assert all(0.0 <= p <= 1.0 for p in result["p1"].values())
    assert "precision@1 (leave-one-out, 24 images)" in out
    assert "target end-to-end img/s (project path) >= 100" in out
    assert "target speed-up vs naive loop >= 10x" in out
    assert result["rss_mb"] > 0


def test_embed_naive_limit_times_the_naive_loop_on_a_spread_subset(make_image_folder,
                                                                   tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", classes=3, per_class=8, size=(48, 40))
    result = embed.main(["--root", str(root), "--images", "12", "--batch", "4",
                         "--naive-limit", "6", "--threads", "1", *TINY_MODEL])
    out = capsys.readouterr().out
    assert result["counts"]["naive"] == 6 and result["counts"]["bf16"] == 12
    assert "naive loop on 6 of them" in out
    assert result["threads"] == 1


def test_onnx_table_compares_both_backends_in_every_group(make_image_folder, tmp_path,
                                                          capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_backend

    root = make_image_folder(tmp_path / "data", classes=3, per_class=4, size=(48, 40))
    result = onnx_backend.main(["--root", str(root), "--images", "12", "--gallery", "6",
                                "--runs", "1", "--rounds", "1", *TINY_MODEL])
    out = capsys.readouterr().out
    rows = table(out, "variant")
    assert len(rows) == 10
    for label, (images, seconds, img_s, ratio) in rows.items():
        assert number(seconds) > 0 and number(img_s) > 0 and number(ratio) > 0, label
        if not label.startswith("process"):
            assert int(images) == 12, label  # every variant saw every image
    first = [label for label in rows if "search default" in label or "end to end, torch" in label
             or label.endswith("--backend torch")]
    assert len(first) == 4 and all(number(rows[f][3]) == 1.0 for f in first)  # baselines
    assert result["parity"] >= 0.9999
    assert (result["bundle"] / "model.onnx").is_file()  # the searched bundle had a graph


def test_train_table_has_each_mode_with_positive_rates(make_image_folder, tmp_path, capsys):
    root = make_image_folder(tmp_path / "data", classes=4, per_class=12, size=(40, 32))
    results = train.main(["--root", str(root), "--steps", "2", "--batch", "8", "--warmup", "1",
                          "--cached-steps", "2", "--modes", "siamese,classification",
                          "--set", "data.num_workers=0", *TINY_MODEL])
    out = capsys.readouterr().out
    rows = table(out, "mode")
    assert list(rows) == ["siamese", "classification"]
    for mode, cells in rows.items():
        frozen = int(cells.pop(6))  # the shipped config's frozen_stages
        assert frozen > 0, mode
        plain, pure, framework, ratio, overhead, wait, cached, cached_ratio = map(number, cells)
        assert plain > 0 and pure > 0 and framework > 0 and cached > 0, mode
        assert math.isclose(ratio, framework / plain, rel_tol=0.02, abs_tol=0.01), mode
        assert overhead < 100 and 0 <= wait <= 100, mode
    for r in results:
        assert r["fw"]["steps"] == 2 and r["cached"]["steps"] >= 1
    assert out.count("target ") == 4  # ratio and overhead per mode


def test_train_rejects_an_unknown_mode(capsys):
    with pytest.raises(SystemExit):
        train.main(["--modes", "regression"])
    assert "unknown modes ['regression']" in capsys.readouterr().err


def test_memory_measures_both_evaluations_in_subprocesses(capsys):
    results = memory.main(["--n", "3000", "--dim", "16", "--queries", "300", "--loo", "yes"])
    out = capsys.readouterr().out
    rows = table(out, "evaluation")
    assert list(rows) == ["300 queries vs 3,000 gallery", "leave-one-out, all 3,000"]
    for r in results:
        assert r["peak"] >= r["rss_before"] > r["rss_imports"] > 0
        assert r["seconds"] > 0 and 0.0 <= r["precision_at_1"] <= 1.0
        assert r["search_k"] == 100  # max_k caps the R-based metrics' depth
    assert math.isclose(results[1]["emb_mib"], 3000 * 16 * 4 / 2**20)
    assert "max_k=100" in out


def test_memory_skips_leave_one_out_over_budget(capsys):
    results = memory.main(["--n", "2000", "--dim", "8", "--queries", "200", "--budget", "0"])
    out = capsys.readouterr().out
    assert len(results) == 1 and len(table(out, "evaluation")) == 1
    assert "leave-one-out over all 2,000 not run" in out


def test_memory_shards_compares_one_array_with_shards(tmp_path, capsys):
    results = memory.main(["--shards", "--n", "3000", "--dim", "16", "--shard-size", "1000",
                           "--tmp", str(tmp_path)])
    out = capsys.readouterr().out
    rows = table(out, "build")
    assert list(rows) == [
        "write 3,000 rows into 3 shards",
        "flat index from one array", "flat index from shards of 1,000",
        "ivf_pq index from one array", "ivf_pq index from shards of 1,000",
    ]  # fmt: skip
    for r in results:
        assert r["peak"] >= r["rss_imports"] > 0 and r["seconds"] >= 0
    for label, cells in rows.items():
        ratio = cells[4]
        assert (ratio == "n/a") != ("from shards" in label), label  # ratio on shard rows only
        if "from shards" in label:
            assert number(ratio) > 0
    assert list(tmp_path.iterdir()) == []  # the shards are removed afterwards


def test_serve_load_reports_every_mode_with_no_errors_or_wrong_answers(capsys):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    result = serve_load.main(["--backbone", "test_efficientnet", "--images", "8", "--clients",
                              "3", "--queries", "2", "--cli-runs", "1", *TINY_MODEL])
    out = capsys.readouterr().out
    rows = table(out, "mode")
    assert list(rows) == ["CLI process (mltrain search --json)", "in process (search_images)",
                          "server, 1 client", "server, 3 clients"]
    assert [int(r[0]) for r in rows.values()] == [1, 16, 2, 6]  # queries answered per mode
    for label, (_, p50, p99, qps, errors, wrong, ratio) in rows.items():
        assert number(ratio) > 0, label
        assert number(p99) >= number(p50) > 0 and number(qps) > 0, label
        assert (int(errors), int(wrong)) == (0, 0), label
    assert number(rows["CLI process (mltrain search --json)"][-1]) == 1.0
    assert result["errors"] == 0 and result["wrong"] == 0 and sum(result["batches"].values())


def test_onnx_batches_reports_both_backends_for_each_size(capsys):
    pytest.importorskip("onnxruntime")
    from benchmarks import onnx_batches

    result = onnx_batches.main(["--backbone", "test_efficientnet", "--pretrained", "false",
                                "--batches", "1", "2", "--rounds", "1", "--images", "2"])
    assert sorted(result) == [1, 2]
    assert all(t > 0 and o > 0 for t, o in result.values())
    assert "| 2 |" in capsys.readouterr().out
