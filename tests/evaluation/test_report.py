"""The evaluation report on a tiny synthetic EvalResult: files, numbers, TensorBoard, colours."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

from mltrain.config import Config
from mltrain.evaluation import contact_sheet, figures, markdown, report, tensorboard
from mltrain.evaluation.contact_sheet import GREEN, RED, query_grid, select_queries
from mltrain.evaluation.evaluate import EmbeddedSplit, EvalResult, compute_metrics
from mltrain.evaluation.figures import plot_pca, plot_roc, plot_tsne, render, sample_rows
from mltrain.evaluation.markdown import markdown_report, worst_below_mean
from mltrain.evaluation.report import write_report
from mltrain.evaluation.tensorboard import heldout_scalars

CLASSES = ["alpha", "beta", "gamma"]
PNGS = ["roc.png", "pca.png", "tsne.png", "tsne_worst.png", "queries.png"]
INTRUDER = 0  # row 0 is an "alpha" embedded inside the "beta" cluster: a sure top-1 failure
STEP = 123  # the checkpoint's global step the evaluation is logged at


def _embeddings(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """3 classes x 10 points in 8-d, well separated; row 0 moved into class 1's cluster."""
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    labels = np.repeat(np.arange(3), 10)
    emb = centres[labels] + rng.normal(0, 0.5, (30, 8)).astype(np.float32)
    emb[INTRUDER] = centres[1] + rng.normal(0, 0.5, 8)
    return emb, labels


def _images(root: Path, labels: np.ndarray) -> list[Path]:
    colours = [(200, 150, 50), (60, 120, 200), (150, 60, 160)]  # far from RED and GREEN
    root.mkdir(parents=True)
    paths = []
    for i, label in enumerate(labels):
        path = root / f"img_{i:02d}.png"
        Image.new("RGB", (12, 10), colours[label]).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> EvalResult:
    rng = np.random.default_rng(0)
    emb, labels = _embeddings(rng)
    paths = _images(tmp_path_factory.mktemp("images") / "img", labels)
    split = EmbeddedSplit(CLASSES, emb, labels, paths, emb, labels, same_set=True)
    cfg = Config()
    cfg.eval.pca_lengths = [2, 4]
    cfg.eval.index_types = ["flat", "hnsw"]
    cfg.eval.verification_pairs = 200
    cfg.eval.one_shot_episodes = 20
    cfg.eval.one_shot_ways = [2]
    res = compute_metrics(split, cfg)
    res.metrics["timing"] = {"embed_seconds": 1.5, "metrics_seconds": 0.25}
    res.metrics["source"] = "synthetic-checkpoint.pt"
    return res


@pytest.fixture(scope="module")
def report_dir(result: EvalResult, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    # The real t-SNE, at sklearn's minimum iteration count: its picture is not under test.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(figures, "TSNE_MAX_ITER", 250)
        mp.setattr(report, "TSNE_MIN_POINTS", 4)  # 30 points: drawn here, not by default
        write_report(out, result, tsne_max_points=25, seed=0, step=STEP,
                     config={"name": "tiny", "model": {"backbone": "resnet18"},
                             "train": {"optimizer": {"name": "sgd", "args": {"lr": 0.1}},
                                       "max_steps": None}})
    return out


def _has_colour(pixels: np.ndarray, colour: tuple[int, int, int], tol: int = 12) -> bool:
    return bool((np.abs(pixels.astype(int) - colour).max(axis=-1) <= tol).any())


def _axes_pixels(fig, ax) -> np.ndarray:
    """The rendered pixels inside one axes (figure y runs bottom-up, arrays top-down)."""
    image = render(fig)
    box = ax.get_window_extent()
    h = image.shape[0]
    return image[int(h - box.y1) : int(h - box.y0), int(box.x0) : int(box.x1)]


def test_every_png_is_written_and_linked(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    for name in PNGS:
        with Image.open(report_dir / name) as img:
            img.load()
            assert img.width > 100 and img.height > 100, name
        assert f"]({name})" in text


def test_report_md_has_the_numbers(result: EvalResult, report_dir: Path) -> None:
    m = result.metrics
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    assert "Source: `synthetic-checkpoint.pt`" in text
    for key, label in [
        ("precision_at_1", "precision@1"),
        ("map_at_r", "MAP@R"),
        ("recall_at_5", "recall@5"),
        ("book_accuracy", "book accuracy"),
        ("mean_per_class_precision_at_1", "mean per-class precision@1"),
    ]:
        assert f"| {label} | {m[key]:.4f} |" in text
    assert m["precision_at_1"] < 1  # the intruder makes the table worth checking
    worst = text.split("## Worst")[1].split("##")[0]
    assert [name for name, _ in m["worst_classes"]][0] == "alpha"
    below = worst_below_mean(m)
    assert [name for name, _ in below] == ["alpha", "beta"]  # gamma, at 1.0, is not "worst"
    for name, p1 in m["worst_classes"]:
        assert (f"| {name} | {p1:.4f} |" in worst) == ((name, p1) in below)
    assert "| alpha | beta |" in text  # the confused pair
    assert (
        "shortest length within 0.5 points of full-length precision@1: "
        f"{m['pca_shortest_within_0.5']}"
    ) in text
    assert f"| {m['one_shot']['2']:.4f} |" in text
    assert "| hnsw |" in text and "| embed | 1.50 |" in text


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(
        str(folder), size_guidance={"images": 0, "scalars": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


def test_tensorboard_holds_heldout_metrics_at_the_checkpoint_step(
    result: EvalResult, report_dir: Path
) -> None:
    acc = _events(report_dir)
    (event,) = acc.Scalars("val/precision_at_1")
    assert event.step == STEP
    assert event.value == pytest.approx(result.metrics["precision_at_1"], abs=1e-6)
    (auc,) = acc.Scalars("val/roc_auc")
    assert auc.value == pytest.approx(result.metrics["verification"]["roc_auc"], abs=1e-6)
    scalars = acc.Tags()["scalars"]
    assert sorted(scalars) == sorted(tensorboard.HPARAM_METRICS)  # no one-dot count charts
    assert {e.step for tag in scalars for e in acc.Scalars(tag)} == {STEP}
    assert {f"report/{Path(n).stem}" for n in PNGS} <= set(acc.Tags()["images"])
    assert {e.step for e in acc.Images("report/roc")} == {STEP}


def test_tensorboard_text_hparams_and_pr_curve(result: EvalResult, report_dir: Path) -> None:
    acc = _events(report_dir)
    texts = {
        tag: acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()
        for tag in acc.Tags()["tensors"]
        if tag.endswith("text_summary")
    }
    report_text = texts["eval/report/text_summary"]
    assert report_text.startswith("# Evaluation report") and "![" not in report_text
    diagnostics = texts["eval/diagnostics/text_summary"]
    assert f"| num queries | {result.metrics['num_queries']} |" in diagnostics
    assert "| embed | 1.50 |" in diagnostics and "| hnsw |" in diagnostics
    content = acc.PluginTagToContent("hparams")
    hp = HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    values = hp.session_start_info.hparams
    assert values["lr"].number_value == 0.1 and values["optimizer"].string_value == "sgd"
    assert values["backbone"].string_value == "resnet18" and len(values) <= 20
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    declared = [m.name.tag for m in experiment.metric_infos]
    assert sorted(declared) == sorted(tensorboard.HPARAM_METRICS)  # as training declares
    (pr,) = acc.Tensors("val/verification_pr")
    assert pr.step == STEP


def test_projector_metadata_has_a_header_and_columns(
    result: EvalResult, report_dir: Path
) -> None:
    lines = next(report_dir.glob("*/heldout/metadata.tsv")).read_text().split("\n")[:-1]
    assert lines[0].split("\t") == tensorboard.PROJECTOR_HEADER
    rows = [line.split("\t") for line in lines[1:]]
    assert len(rows) == len(result.split.heldout_labels)
    assert [r[0] for r in rows] == [CLASSES[c] for c in result.split.heldout_labels]
    assert rows[INTRUDER][1:3] == ["no", "beta"]  # top-1 wrong, retrieved from beta
    assert [r[3] for r in rows] == [p.name for p in result.split.heldout_paths]
    worst = {name for name, _ in worst_below_mean(result.metrics)}
    assert worst == {"alpha", "beta"}
    assert all((r[4] == "yes") == (r[0] in worst) for r in rows)
    assert sum(r[1] == "yes" for r in rows) == round(
        result.metrics["precision_at_1"] * result.metrics["num_queries"]
    )
    assert next(report_dir.glob("*/heldout/sprite.png")).is_file()
    assert "heldout" in (report_dir / "projector_config.pbtxt").read_text()
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    assert f"projector holds {len(rows)} of the {len(rows)} held-out embeddings" in text


def test_query_grid_outlines_wrong_results_red(result: EvalResult) -> None:
    nb = result.neighbours
    assert nb.labels[INTRUDER, 0] != nb.query_labels[INTRUDER]
    right = int(np.flatnonzero(nb.labels[:, 0] == nb.query_labels)[0])
    paths = result.split.heldout_paths
    fig = query_grid(nb, paths, paths, CLASSES, queries=[INTRUDER, right], top=5)
    axes = np.array(fig.axes).reshape(2, 6)
    wrong_top = _axes_pixels(fig, axes[0, 1])
    assert _has_colour(wrong_top, RED) and not _has_colour(wrong_top, GREEN)
    right_top = _axes_pixels(fig, axes[1, 1])
    assert _has_colour(right_top, GREEN) and not _has_colour(right_top, RED)
    score = nb.scores[INTRUDER, 0]
    assert axes[0, 1].get_title() == f"1. beta\n{score:.3f}"
    assert axes[0, 1].texts[0].get_text() == paths[nb.indices[INTRUDER, 0]].name


def test_select_queries_puts_failures_first(result: EvalResult) -> None:
    nb = result.neighbours
    rows = select_queries(nb, n=8, seed=1)
    wrong = nb.labels[rows, 0] != nb.query_labels[rows]
    n_wrong = int((nb.labels[:, 0] != nb.query_labels).sum())
    assert len(rows) == 8 and len(set(rows.tolist())) == 8
    assert wrong.sum() == min(4, n_wrong) and wrong[: wrong.sum()].all()


def test_no_tsne_and_a_foreign_gallery(result: EvalResult, tmp_path: Path) -> None:
    """tsne=False skips both t-SNE pictures; neighbours from another gallery (labels that do
    not match the held-out rows) skip the query grid with a note instead of wrong pictures."""
    nb = result.neighbours
    foreign = replace(nb, labels=(nb.labels + 1) % 3)
    write_report(tmp_path, replace(result, neighbours=foreign), tsne=False)
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert not list(tmp_path.glob("tsne*.png")) and "tsne" not in text
    assert not (tmp_path / "queries.png").exists() and "No query grid" in text
    assert (tmp_path / "roc.png").is_file()


def test_tsne_legend_up_to_20_classes_then_names_at_centres(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The legend logic is under test, not t-SNE (write_report's fixture runs the real one).
    monkeypatch.setattr(figures, "tsne_2d", lambda emb, seed=0: np.asarray(emb)[:, :2])
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(25), 2)
    emb = rng.normal(size=(50, 8)) + labels[:, None]
    names = [f"c{i}" for i in range(25)]
    many = plot_tsne(emb, labels, names, max_points=40)
    ax = many.axes[0]
    assert ax.get_legend() is None  # nothing highlighted: names at the cluster centres only
    assert sum(len(c.get_offsets()) for c in ax.collections) == 40
    present = {names[c] for c in labels[sample_rows(50, 40)]}
    assert {t.get_text() for t in ax.texts} == present
    marked = plot_tsne(emb, labels, names, highlight=["c3", "c7"])
    legend = marked.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["c3", "c7"]
    assert legend.get_title().get_text() == "worst classes"
    few = plot_tsne(emb, labels, names, keep_classes=["c3", "c7"])
    texts = [t.get_text() for t in few.axes[0].get_legend().get_texts()]
    assert texts == ["c3", "c7"] and not few.axes[0].texts


def test_worst_means_below_the_mean() -> None:
    even = {"worst_classes": [("a", 1.0), ("b", 1.0)], "mean_per_class_precision_at_1": 1.0}
    assert worst_below_mean(even) == []
    text = markdown_report({**even, "per_class": {"a": {}, "b": {}}})
    assert "No class is below the mean" in text and "| a | 1.0000 |" not in text
    mixed = {
        "worst_classes": [("a", 0.5), ("b", 0.9), ("c", 1.0)],
        "mean_per_class_precision_at_1": 0.8,
    }
    assert worst_below_mean(mixed) == [("a", 0.5)]


def test_report_explains_metrics_and_flags_small_data(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    for key, label, _ in [*markdown.HEADLINE, *markdown.VERIFICATION]:
        body = text.split("## Retrieval")[1]  # after the summary's short table
        if f"| {label} |" in body:
            row = next(line for line in body.splitlines() if line.startswith(f"| {label} |"))
            assert len(row.split("|")) == 5 and len(row.split("|")[3].strip()) > 10, key
    assert "book accuracy" in text and "share of its 4 nearest" in text
    trust = text.split("## How far to trust these numbers")[1].split("##")[0]
    # 30 images in 3 classes: 135 same-class and 300 different-class pairs exist
    assert "30 scored queries: one query moves precision@1 by 0.0333" in trust
    assert "TAR @ FAR 1e-3 is not resolved" in trust and "there are 100" in trust
    assert "TAR @ FAR 1e-2" not in trust  # 100 impostor pairs resolve FAR 1e-2
    assert ("queries.png: All 2 queries whose top result is wrong and 6 of the 28 queries "
            "whose top result is right, drawn at random (seed 0), of 30 scored queries.") in text


def test_compressed_index_above_exact_is_commented() -> None:
    rows = [
        {"kind": k, "precision_at_1": p1, "map_at_r": mr, "build_seconds": 0.1, "query_us": 1.0,
         "bytes": 100}
        for k, p1, mr in [("flat", 0.9, 0.633), ("hnsw", 0.9, 0.633), ("ivf_pq", 0.88, 0.691)]
    ]
    text = markdown_report({"indexes": rows})
    assert "ivf_pq scores above exact search (MAP@R 0.6910 against 0.6330)" in text
    assert "hnsw scores above" not in text
    pca = {
        str(n): {"length": n, "pca": n < 64, "precision_at_1": p1, "map_at_r": 0.5}
        for n, p1 in [(16, 0.8), (32, 0.87), (64, 0.84)]
    }
    text = markdown_report({"pca": pca})
    assert "PCA to 32 scores above the full length (precision@1 0.8700 against 0.8400)" in text


def test_sample_rows_is_seeded_and_bounded() -> None:
    a, b = sample_rows(5000, 1000, seed=3), sample_rows(5000, 1000, seed=3)
    assert len(a) == 1000 and np.array_equal(a, b) and np.all(np.diff(a) > 0)
    assert np.array_equal(sample_rows(7, 1000), np.arange(7))


def test_heldout_scalars_are_the_headline_fractions() -> None:
    tags = heldout_scalars(
        {
            "precision_at_1": 0.5,
            "recall_at_5": 0.75,
            "map_at_r": 0.25,
            "num_queries": 30,
            "embedding_dim": 8,
            "flag": True,
            "per_class": {"a": {}},
            "verification": {"eer": 0.1, "num_pairs": 200, "best_threshold": 0.3},
            "one_shot": {"5": 0.9},
            "indexes": [{"kind": "hnsw", "query_us": 3.0}],
        }
    )
    assert tags == {  # recall@k and the like stay in report.md, off the charts
        "val/precision_at_1": 0.5,
        "val/map_at_r": 0.25,
        "val/eer": 0.1,
    }
    # the training loop keeps verification figures flat: same tags
    assert heldout_scalars({"roc_auc": 0.9, "num_queries": 3}) == {"val/roc_auc": 0.9}


def test_plots_titles_and_axes(result: EvalResult) -> None:
    ver = result.metrics["verification"]
    roc = plot_roc(result.curves["fpr"], result.curves["tpr"], ver)
    assert f"AUC {ver['roc_auc']:.4f}" in roc.axes[0].get_title()
    assert roc.axes[0].get_xscale() == "log"
    rows = list(result.metrics["pca"].values())
    pca = plot_pca(rows, shortest=rows[0]["length"])
    assert len(pca.axes) == 2  # twin latency axis
    ticks = [t.get_text() for t in pca.axes[0].get_xticklabels()]
    assert ticks == ["2", "4", "8\n(full)"]  # one tick per length, at the length
    assert np.allclose(pca.axes[0].get_xticks(), [2, 4, 8])
    assert pca.axes[0].get_xscale() == "log"
    (legend,) = pca.legends  # the figure's, under the axes: it cannot cover a curve
    assert pca.axes[0].get_legend() is None
    assert "shortest within 0.5 points (2)" in [t.get_text() for t in legend.get_texts()]


def test_markdown_escapes_pipes_and_notes_missing_one_shot() -> None:
    text = markdown_report(
        {
            "worst_classes": [("a|b", 0.25)],
            "per_class": {"a|b": {"num_queries": 4}},
            "one_shot": {"20": None},
            "confused_pairs": [],
        }
    )
    assert "| a\\|b | 0.2500 | 4 |" in text
    assert "| 20-way | n/a (too few classes) |" in text
    assert "No top-1 mistakes: every query's nearest image has its class." in text
    assert "## Most confused" not in text


def test_a_perfect_precision_is_not_given_a_standard_error_of_zero() -> None:
    perfect = "\n".join(markdown._reliability({"num_queries": 30, "precision_at_1": 1.0}))
    assert "standard error says nothing at 1.0000: by the rule of three the true rate may still " \
           "be 0.1000 away" in perfect and "about 0.0000" not in perfect
    usual = "\n".join(markdown._reliability({"num_queries": 100, "precision_at_1": 0.9}))
    assert "standard error is about 0.0300" in usual  # sqrt(0.9 * 0.1 / 100)


def test_a_saturated_precision_points_the_pca_length_to_map_at_r() -> None:
    rows = {"8": {"length": 8, "pca": True, "precision_at_1": 1.0, "map_at_r": 0.919},
            "512": {"length": 512, "pca": False, "precision_at_1": 1.0, "map_at_r": 0.977}}
    text = markdown.pca_section({"pca": rows, "pca_shortest_within_0.5": 8})
    assert ("full-length precision@1: 8 (full length 512). Precision@1 is saturated (1.0000): "
            "judge the length by MAP@R, 0.9190 there against 0.9770.") in "\n".join(text)
    rows["512"]["precision_at_1"] = rows["8"]["precision_at_1"] = 0.9
    assert "saturated" not in "\n".join(markdown.pca_section({"pca": rows,
                                                              "pca_shortest_within_0.5": 8}))


def test_an_eer_on_few_classes_is_flagged_as_coarse() -> None:
    ver = {"num_pairs": 2000, "num_impostor": 1000, "eer": 0.08, "roc_auc": 0.97}
    five = {f"p{i}": {"num_queries": 19} for i in range(5)}
    lines = markdown._reliability({"verification": ver, "per_class": five})
    assert "EER and ROC AUC rest on pairs of only 5 classes: another 5 would move the EER by " \
           "points" in "\n".join(lines)
    wide = {**ver, "num_classes": 40}  # the pairs' classes count, not only those with queries
    assert not any("EER" in r for r in markdown._reliability({"verification": wide,
                                                              "per_class": five}))  # fmt: skip
    many = {f"p{i}": {"num_queries": 19} for i in range(markdown.FEW_VERIFICATION_CLASSES)}
    assert not any("EER" in r for r in markdown._reliability({"verification": ver,
                                                              "per_class": many}))  # fmt: skip


def test_class_names_the_font_lacks_draw_without_a_warning_per_glyph():
    """CJK class names must not print matplotlib's 'Glyph ... missing' lines during training."""
    import warnings

    fig = figures.new_figure(2, 1)
    fig.suptitle("本 字 class")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        pixels = figures.render(fig)
    assert pixels.ndim == 3 and pixels.shape[2] == 3


def test_report_opens_with_the_data_and_the_main_figures(result: EvalResult, report_dir: Path):
    text = (report_dir / "report.md").read_text(encoding="utf-8")
    head = text.split("## Retrieval")[0]
    assert "Measured on 30 held-out images of 3 classes (alpha, beta, gamma)." in head  # named
    assert f"| precision@1 | **{result.metrics['precision_at_1']:.4f}** |" in head
    ver = result.metrics["verification"]
    assert f"| EER | **{ver['eer']:.4f}** |" in head


def test_a_trained_checkpoint_is_compared_with_the_untrained_start(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    start = {"precision_at_1": 0.5, "map_at_r": 0.25, "eer": 0.2}
    (run / "metrics.json").write_text(json.dumps({"start": start, "selected_on": "heldout"}))
    source = str(run / "checkpoints" / "best.pt")
    assert report.untrained_baseline(source, step=40) == start
    assert report.untrained_baseline(source, step=0) is None  # the untrained model itself
    assert report.untrained_baseline("resnet18", step=40) is None  # a backbone
    (run / "metrics.json").write_text(json.dumps({"start": start, "selected_on": "validation"}))
    assert report.untrained_baseline(source, step=40) is None  # other images: not comparable
    m = {"precision_at_1": 0.75, "map_at_r": 0.25, "verification": {"eer": 0.1}}
    text = markdown_report(m, data={"heldout_images": 40, "heldout_classes": 4,
                                    "train_images": 60, "split": "class_disjoint"},
                           baseline=start)  # fmt: skip
    assert text.splitlines()[2] == ("Measured on 40 held-out images of 4 classes, classes it "
                                    "never trained on (the model trained on 60 images).")
    named = markdown_report(m, data={"heldout_images": 40, "heldout_classes": 2,
                                     "heldout_class_names": ["ann", "bob"]})  # fmt: skip
    assert named.splitlines()[2] == "Measured on 40 held-out images of 2 classes (ann, bob)."
    assert "| precision@1 | **0.7500** | 0.5000 | +0.2500 (better) |" in text
    assert "| MAP@R | **0.2500** | 0.2500 | +0.0000 (same) |" in text
    assert "| EER | **0.1000** | 0.2000 | -0.1000 (better) |" in text  # lower is better


def test_a_perfect_run_has_no_empty_headings_or_zero_counts() -> None:
    m = {"precision_at_1": 1.0, "num_queries": 12, "mean_per_class_precision_at_1": 1.0,
         "worst_classes": [("a", 1.0), ("b", 1.0)], "per_class": {"a": {}, "b": {}},
         "confused_pairs": []}  # fmt: skip
    text = markdown_report(m)
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("#"):
            following = next((x for x in lines[i + 1 :] if x.strip()), "#")
            assert not following.startswith("#") or line.startswith("# "), line  # no empty section
    assert "Worst" not in text and "Most confused" not in text
    nb = SimpleNamespace(scored=np.ones(4, bool), labels=np.array([[0], [1], [0], [1]]),
                         indices=np.array([[1], [0], [3], [2]]),
                         query_labels=np.array([0, 1, 0, 1]))  # fmt: skip
    note = contact_sheet.queries_note(nb, np.array([0, 2]), seed=0)
    assert note == ("2 of the 4 queries whose top result is right, drawn at random (seed 0), of "
                    "4 scored queries. No query's top result is wrong.")
    assert " 0 " not in note


def test_no_tsne_on_too_few_points(result: EvalResult, tmp_path: Path) -> None:
    write_report(tmp_path, result, seed=0)  # 30 held-out points, under TSNE_MIN_POINTS
    text = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert not list(tmp_path.glob("tsne*.png"))
    assert f"No t-SNE: 30 held-out embeddings, fewer than the {report.TSNE_MIN_POINTS}" in text


def test_tsne_colours_neighbouring_classes_apart_and_rings_misses(monkeypatch) -> None:
    monkeypatch.setattr(figures, "tsne_2d", lambda emb, seed=0: np.asarray(emb)[:, :2])
    # 20 classes in a row; tab20 gives classes 2k and 2k+1 a colour and its lighter twin
    labels = np.repeat(np.arange(20), 3)
    emb = np.zeros((60, 2))
    emb[:, 0] = labels + np.tile([0.0, 0.1, 0.2], 20)
    wrong = np.zeros(60, bool)
    wrong[[0, 5]] = True
    fig = plot_tsne(emb, labels, [f"c{i}" for i in range(20)], misses=wrong)
    ax = fig.axes[0]
    tab20 = matplotlib.colormaps["tab20"](np.arange(20))
    drawn = [int(np.abs(tab20 - c.get_facecolor()[0]).sum(1).argmin()) for c in ax.collections[:20]]
    assert sorted(drawn) == list(range(20))  # every class its own colour
    assert all(a // 2 != b // 2 for a, b in zip(drawn, drawn[1:], strict=False))  # no twins
    gaps = [np.abs(tab20[a, :3] - tab20[b, :3]).sum() for a, b in zip(drawn, drawn[1:],
                                                                        strict=False)]
    assert min(gaps) > 0.5  # well apart in RGB (the grey twins are 0.39 apart)
    ring = ax.collections[20]
    assert len(ring.get_offsets()) == 2
    assert "top result wrong (2)" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_roc_marks_the_eer_and_far_1e3(result: EvalResult) -> None:
    ver = result.metrics["verification"]
    roc = plot_roc(result.curves["fpr"], result.curves["tpr"], ver)
    labels = [t.get_text() for t in roc.axes[0].get_legend().get_texts()]
    assert f"EER {ver['eer']:.4f} (FAR = 1 - TAR)" in labels
    assert any(label.startswith("FAR 1e-3") for label in labels)
    assert any(list(line.get_xdata()) == [1e-3, 1e-3] for line in roc.axes[0].lines)


def test_query_grid_names_are_legible() -> None:
    assert contact_sheet.wrapped("Eurasian_collared_dove_Streptopelia_decaocto", 20) == (
        "Eurasian_collared_\ndove_S…elia_decaocto")
    assert contact_sheet.wrapped("img_0042.jpg", 20) == "img_0042.jpg"
