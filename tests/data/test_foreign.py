"""The shipped configs on data that looks nothing like Caltech101, run as a user runs them.

Whole commands in subprocesses, with only `data.root`, `train.max_steps` and
`model.pretrained: false` overridden: nested greyscale PGM drawings (20 classes x 10), a
3-class folder of 30 JPEGs, a 60-image folder, a CSV of labels; no BACKGROUND_Google anywhere.
Each must train, evaluate, export and search with notes instead of errors, and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.foreign_data import write_csv_folder, write_drawings, write_photos

REPO = Path(__file__).resolve().parents[2]
CONFIGS = ["classification", "pooling", "siamese", "triplet"]
DRAWING_CLASSES = [f"alphabet_{a}/char_{c:02d}" for a in range(4) for c in range(5)]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    return proc


def train(config: str, root: Path, work: Path, *extra: str) -> Path:
    proc = run(
        str(REPO / "train.py"), "--config", str(REPO / "configs" / f"{config}.yaml"),
        "--set", f"data.root={root}", "--set", "train.max_steps=2",
        "--set", "model.pretrained=false", "--set", f"output_dir={work / 'experiments'}",
        *extra, cwd=work,
    )  # fmt: skip
    return Path(proc.stdout.strip().splitlines()[-1])


def evaluate_and_export(checkpoint: Path, bundle: Path, work: Path) -> dict:
    proc = run(
        str(REPO / "evaluate.py"), "--checkpoint", str(checkpoint), "--export", str(bundle),
        cwd=work,
    )  # fmt: skip
    out = Path(proc.stdout.strip().splitlines()[-1].removeprefix("results: "))
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> Path:
    return write_drawings(tmp_path_factory.mktemp("foreign") / "drawings")


@pytest.mark.parametrize("config", CONFIGS)
def test_shipped_config_on_nested_greyscale_drawings(config, drawings, tmp_path):
    run_dir = train(config, drawings, tmp_path)
    notes = (run_dir / "notes.txt").read_text() if (run_dir / "notes.txt").exists() else ""
    assert "BACKGROUND_Google" not in notes  # excluded by default, absent here: said nowhere
    split = json.loads((run_dir / "split.json").read_text())
    assert {c for _, c in split["train"]} == set(DRAWING_CLASSES)
    metrics = evaluate_and_export(run_dir / "checkpoints" / "best.pt", tmp_path / "b", tmp_path)
    assert metrics["num_queries"] == 100 and metrics["embedding_dim"] > 0
    assert set(metrics["per_class"]) == set(DRAWING_CLASSES)
    state = torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]
    if "whiten.matrix" not in state:
        assert "PCA lengths 128, 256, 512" in metrics["skipped"]  # 100 training rows
    else:  # the whitening kept in best.pt sets the length: 100 rows of 20 classes and their
        # 100 mirror images (the shipped configs flip), so 180 at most
        assert metrics["embedding_dim"] == state["whiten.matrix"].shape[1] <= 180
    assert not any("BACKGROUND_Google" in n for n in metrics["notes"])
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["classes"] == DRAWING_CLASSES and manifest["count"] == 200
    query = drawings / "alphabet_2" / "char_03" / "7.pgm"
    found = run("-m", "mltrain", "search", str(tmp_path / "b"), str(query), "--json", cwd=tmp_path)
    top = json.loads(found.stdout)["queries"][0]["results"][0]
    assert top["path"] == "alphabet_2/char_03/7.pgm" and top["class"] == "alphabet_2/char_03"


def test_pretrained_evaluate_and_export_on_60_images(tmp_path):
    root = write_photos(tmp_path / "photos", classes=6, per_class=10)
    proc = run(
        str(REPO / "evaluate.py"), "--backbone", "tf_efficientnet_lite0",
        "--config", str(REPO / "configs" / "pooling.yaml"), "--set", f"data.root={root}",
        "--set", "model.pretrained=false", "--set", f"output_dir={tmp_path / 'exp'}",
        "--export", str(tmp_path / "b"), cwd=tmp_path,
    )  # fmt: skip
    out = Path(proc.stdout.strip().splitlines()[-1].removeprefix("results: "))
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_queries"] == 30  # per_class split: half of each class held out
    assert m["skipped"]["index ivf_pq"].startswith("ivf_pq needs at least 160 training vectors")
    assert m["skipped"]["20-way one-shot"] == (
        "only 6 held-out classes have the 2 images an episode needs"
    )
    assert "PCA lengths 32, 64, 100, 128, 256, 512" in m["skipped"]  # 30 training rows
    assert sorted(m["pca"], key=int) == ["8", "16", "1280"]
    assert m["pca_shortest_within_0.5"] in (8, 16, 1280)
    assert m["verification"]["num_genuine"] == 6 * 10  # 6 x C(5, 2): every distinct pair
    assert [r["kind"] for r in m["indexes"]] == ["flat", "hnsw", "ivf_flat"]
    report = (out / "report.md").read_text()
    assert "index ivf_pq skipped" in report and "## Notes" in report
    assert "WARNING clustering" not in proc.stderr
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["count"] == 60


def test_few_classes_fit_the_batch_and_csv_labels(tmp_path):
    run_dir = train("triplet", write_photos(tmp_path / "p", classes=3, per_class=10), tmp_path)
    assert "train.batch_size 64 lowered to 6" in (run_dir / "notes.txt").read_text()  # 3 x m 2
    notes = json.loads((run_dir / "metrics.json").read_text())["notes"]
    assert any("train.batch_size 64 lowered to 6" in n for n in notes)  # not only notes.txt
    csv_path = write_csv_folder(tmp_path / "catalogue", classes=4, per_class=8)
    run_dir = train("classification", csv_path, tmp_path)
    metrics = evaluate_and_export(run_dir / "checkpoints" / "best.pt", tmp_path / "b", tmp_path)
    assert set(metrics["per_class"]) == {f"product {i}" for i in range(4)}
    rows = (tmp_path / "b" / "metadata.csv").read_text().splitlines()
    assert rows[1].startswith("images/0000.png,0,product 0,")
