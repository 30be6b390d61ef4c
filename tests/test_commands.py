"""The command family as a user runs it: `python -m mltrain export | search | add | verify`,
whole processes on a generated folder (offline lite0 weights, so two processes agree)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.foreign_data import write_drawings, write_photos

REPO = Path(__file__).resolve().parents[1]


def mltrain(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert "Traceback" not in proc.stderr, proc.stderr
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A bundle of 5 classes x 8 photos written by `python -m mltrain export` (split none)."""
    work = tmp_path_factory.mktemp("cmd")
    root = write_photos(work / "photos", classes=5, per_class=8)
    args = ["--backbone", "tf_efficientnet_lite0", "--config", str(REPO / "configs/pooling.yaml"),
            "--set", f"data.root={root}", "--set", "data.split=none",
            "--set", f"output_dir={work / 'exp'}"]  # fmt: skip
    proc = mltrain("-m", "mltrain", "export", *args, "--out", str(work / "bundle"), cwd=work)
    assert "exported 40 images" in proc.stdout
    return work, root, args


def test_export_then_search_through_both_doors(exported):
    work, root, _ = exported
    query = root / "c3" / "5.jpg"
    script = ["-c", "import sys; from mltrain.commands.search import script; sys.exit(script())"]
    for door in (["-m", "mltrain", "search"], script):  # the second is what mltrain-search runs
        proc = mltrain(*door, str(work / "bundle"), str(query), "--json", cwd=work)
        top = json.loads(proc.stdout)["queries"][0]["results"][0]
        assert top["path"] == "c3/5.jpg" and top["class"] == "c3"


def test_export_equals_what_evaluate_export_writes(exported):
    work, _, args = exported
    out = mltrain(str(REPO / "evaluate.py"), *args, "--export", str(work / "via-eval"),
                  cwd=work).stdout  # fmt: skip
    a = np.load(work / "bundle" / "embeddings.npy")
    b = np.load(work / "via-eval" / "embeddings.npy")
    np.testing.assert_allclose(a, b, atol=1e-6)
    ma, mb = (json.loads((work / d / "manifest.json").read_text()) for d in ("bundle", "via-eval"))
    assert (work / "bundle" / "metadata.csv").read_text() == (
        work / "via-eval" / "metadata.csv"
    ).read_text()
    assert ma["verification"] == mb["verification"] and ma["count"] == mb["count"] == 40
    default = mb["rerank"]["default"]  # evaluate --export says what it wrote
    said = f"exported 40 images to {work / 'via-eval'}" + (
        f"; search re-ranks with {default} by default" if default != "none" else "")
    assert said in out.splitlines(), out


def test_manifest_threshold_reproduces_its_far(exported):
    work, _, _ = exported
    cal = json.loads((work / "bundle" / "manifest.json").read_text())["verification"]
    assert cal["rows"] == "all"  # split none: every row calibrates
    by_far = {row["far"]: row for row in cal["thresholds"]}
    assert set(by_far) == {1e-1, 1e-2, 1e-3, 1e-4}
    for far, row in by_far.items():
        assert row["achieved_far"] <= far
        assert row["genuine_pairs"] == 5 * 28 and row["impostor_pairs"] == 640  # all distinct
    assert by_far[1e-1]["threshold"] <= by_far[1e-2]["threshold"] <= by_far[1e-3]["threshold"]


def test_verify_same_and_different(exported):
    work, root, _ = exported
    bundle = str(work / "bundle")
    same = mltrain("-m", "mltrain", "verify", bundle, str(root / "c2/1.jpg"),
                   str(root / "c2/6.jpg"), "--far", "0.01", cwd=work)  # fmt: skip
    diff = mltrain("-m", "mltrain", "verify", bundle, str(root / "c2/1.jpg"),
                   str(root / "c4/6.jpg"), "--far", "0.01", cwd=work)  # fmt: skip
    assert same.stdout.strip().endswith(": same")
    assert diff.stdout.strip().endswith(": different")
    assert "threshold" in same.stdout and "FAR 0.01 on 640 all impostor pairs" in same.stdout


def test_enrol_unseen_classes_with_one_image_each_then_identify(exported, tmp_path):
    work, _, _ = exported
    bundle = tmp_path / "bundle"
    subprocess.run(["cp", "-r", str(work / "bundle"), str(bundle)], check=True)
    new = write_drawings(tmp_path / "new", alphabets=1, chars=2, per_class=6)  # unseen kinds
    enrol = tmp_path / "enrol"
    for cls in ("char_00", "char_01"):
        (enrol / cls).mkdir(parents=True)
        (enrol / cls / "0.pgm").write_bytes((new / "alphabet_0" / cls / "0.pgm").read_bytes())
    proc = mltrain("-m", "mltrain", "add", str(bundle), str(enrol), cwd=tmp_path)
    assert "added 2 images" in proc.stdout
    queries = [str(new / "alphabet_0" / cls / f"{i}.pgm")
               for cls in ("char_00", "char_01") for i in range(1, 6)]  # fmt: skip
    out = mltrain("-m", "mltrain", "search", str(bundle), *queries, "--json", "-k", "1",
                  cwd=tmp_path)  # fmt: skip
    tops = [q["results"][0]["class"] for q in json.loads(out.stdout)["queries"]]
    assert tops == ["char_00"] * 5 + ["char_01"] * 5


def test_threshold_answers_unknown_below_it(exported):
    work, root, _ = exported
    query = str(root / "c1" / "2.jpg")
    args = ["-m", "mltrain", "search", str(work / "bundle"), query, "--json"]
    mirrored = work / "mirrored.jpg"  # not in the bundle: no hit reaches similarity 1
    Image.open(query).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored)
    high = json.loads(mltrain(*args[:-2], str(mirrored), "--json", "--threshold", "1",
                              cwd=work).stdout)["queries"][0]  # fmt: skip
    low = json.loads(mltrain(*args, "--threshold", "-1", cwd=work).stdout)["queries"][0]
    auto = json.loads(mltrain(*args, "--threshold", "auto", cwd=work).stdout)["queries"][0]
    assert high["answer"] == "unknown" and not any(h["match"] for h in high["results"])
    assert low["answer"] == "c1" and all(h["match"] for h in low["results"])
    assert auto["answer"] == "c1"  # the image itself is in the bundle: similarity 1
    # The text output says which threshold decided; past a cosine's range is a slip, refused
    # as the server refuses it (it used to mark every hit "no match" without a word).
    text = mltrain(*args[:-1], "--threshold", "auto", cwd=work).stdout
    assert re.search(r"^threshold \d\.\d{4} \(calibrated at FAR 0\.001\): a hit at or above "
                     r"it is a match$", text, re.M), text  # fmt: skip
    slip = mltrain(*args, "--threshold", "1.01", cwd=work, ok=False)
    assert slip.stderr == ("error: --threshold 1.01 is outside [-1, 1], the range of a cosine "
                           "similarity; give a value in it or auto\n")  # fmt: skip


def test_bad_input_is_one_line(exported, tmp_path):
    work, root, _ = exported
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    bad = mltrain("-m", "mltrain", "verify", str(work / "bundle"), str(text),
                  str(root / "c1/1.jpg"), cwd=tmp_path, ok=False)  # fmt: skip
    assert bad.returncode == 2 and "notes.jpg" in bad.stderr
    missing = mltrain("-m", "mltrain", "search", str(tmp_path / "nope"), str(root / "c1/1.jpg"),
                      cwd=tmp_path, ok=False)  # fmt: skip
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    bare = tmp_path / "bare"
    subprocess.run(["cp", "-r", str(work / "bundle"), str(bare)], check=True)
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["verification"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    none = mltrain("-m", "mltrain", "verify", str(bare), str(root / "c1/1.jpg"),
                   str(root / "c1/2.jpg"), cwd=tmp_path, ok=False)  # fmt: skip
    assert "holds no calibrated threshold" in none.stderr and none.returncode == 2
    unknown = mltrain("-m", "mltrain", "fly", cwd=tmp_path, ok=False)
    assert "unknown command 'fly'" in unknown.stderr


def test_search_with_rerank_keeps_the_image_itself_first(exported):
    work, root, _ = exported
    for method in ("k_reciprocal", "alpha_qe"):
        proc = mltrain("-m", "mltrain", "search", str(work / "bundle"), str(root / "c4/3.jpg"),
                       "--json", "-k", "3", "--rerank", method, cwd=work)  # fmt: skip
        hits = json.loads(proc.stdout)["queries"][0]["results"]
        assert len(hits) == 3 and hits[0]["path"] == "c4/3.jpg"
        assert [h["class"] for h in hits] == ["c4"] * 3
    text = mltrain("-m", "mltrain", "search", str(work / "bundle"), str(root / "c4/3.jpg"),
                   "-k", "3", "--rerank", "alpha_qe", cwd=work).stdout  # fmt: skip
    assert ("; re-ranked with alpha_qe, so the hits follow its order and each score stays the "
            "plain cosine one") in text.splitlines()[0]


def test_evaluate_export_carries_its_rerank_finding_into_search(exported):
    work, root, args = exported
    if not (work / "via-eval").exists():  # written by the parity test above
        mltrain(str(REPO / "evaluate.py"), *args, "--export", str(work / "via-eval"), cwd=work)
    manifest = json.loads((work / "via-eval" / "manifest.json").read_text())
    measured = manifest["rerank"]["measured"]
    assert manifest["rerank"]["default"] == measured["recommended"]
    assert set(measured) >= {"none", "k_reciprocal", "alpha_qe", "rows"}
    out = mltrain("-m", "mltrain", "search", str(work / "via-eval"), str(root / "c2/4.jpg"),
                  "--json", cwd=work)  # fmt: skip
    assert json.loads(out.stdout)["rerank"] == manifest["rerank"]["default"]
    plain = mltrain("-m", "mltrain", "search", str(work / "bundle"), str(root / "c2/4.jpg"),
                    "--json", cwd=work)  # fmt: skip
    assert json.loads(plain.stdout)["rerank"] == "none"  # mltrain export measured nothing


def test_the_done_line_counts_in_words(tmp_path):
    from mltrain.commands.train import summary_line

    metrics = {"epochs": 1, "steps": 1, "setup_seconds": 2.0, "train_seconds": 3.0,
               "best": {"epoch": 1, "map_at_r": 0.5}, "best_metric": "map_at_r"}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert summary_line(tmp_path).startswith("done: 1 epoch, 1 step (2 s setup + 3 s training)")
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "epochs": 2, "steps": 8}))
    assert summary_line(tmp_path).startswith("done: 2 epochs, 8 steps")


def test_add_has_its_own_help():
    proc = subprocess.run([sys.executable, "-m", "mltrain", "add", "--help"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    usage = proc.stdout.split("\n\n")[0]
    assert usage.startswith("usage: mltrain add [-h] [--class CLASS_NAME]")
    assert " ".join(usage.split()).endswith("bundle images [images ...]")
    assert "--sheet" not in proc.stdout and "--threshold" not in proc.stdout  # search's own


def test_the_done_line_names_what_was_scored_and_an_untrained_best(tmp_path):
    """Figures of validation classes are not called held-out, a best at epoch 0 is the
    untrained start, and a random-init model's statistics are not called pretrained."""
    from mltrain.commands.train import summary_line

    metrics = {"epochs": 2, "steps": 4, "setup_seconds": 1.0, "train_seconds": 2.0,
               "best": {"epoch": 0, "eer": 0.2, "pretrained_bn_stats": 1},
               "best_metric": "roc_auc", "selected_on": "validation"}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert summary_line(tmp_path).endswith(", best validation EER 0.2000 (the untrained start, "
                                           "epoch 0, picked by roc_auc, starting BatchNorm "
                                           "statistics)")  # fmt: skip
    plain = {**metrics, "best": {"epoch": 3, "eer": 0.1}, "selected_on": "heldout"}
    (tmp_path / "metrics.json").write_text(json.dumps(plain))
    assert summary_line(tmp_path).endswith(", best held-out EER 0.1000 (epoch 3, picked by "
                                           "roc_auc)")  # fmt: skip


def test_the_done_line_shows_the_picking_metric_and_what_came_after_the_epoch(tmp_path):
    """The best figures are the epoch's after the whitening: the line says so, or they would
    not match that epoch's own line; and the figure best.pt was picked on is shown."""
    from mltrain.commands.train import summary_line

    best = {"epoch": 2, "map_at_r": 0.83, "eer": 0.11, "roc_auc": 0.97, "whiten_dims": 256,
            "flip_tta": 1.0}  # fmt: skip
    metrics = {"epochs": 2, "steps": 4, "setup_seconds": 1.0, "train_seconds": 2.0,
               "best": best, "best_metric": "roc_auc", "selected_on": "validation"}  # fmt: skip
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    assert summary_line(tmp_path).endswith(
        ", best validation MAP@R 0.8300, EER 0.1100, ROC AUC 0.9700 (epoch 2 with the whitening "
        "fitted after training and mirror averaging, picked by roc_auc)")
    (tmp_path / "metrics.json").write_text(json.dumps(
        {**metrics, "best": {**best, "flip_tta": 0.0}}))  # fmt: skip
    assert "(epoch 2 with the whitening fitted after training, picked" in summary_line(tmp_path)
    for key, name in (("map_at_r", "MAP@R 0.8300"), ("eer", "EER 0.1100"),
                      ("precision_at_1", "precision@1 0.9000")):  # fmt: skip
        picked = {**metrics, "best_metric": key, "best": {"epoch": 1, "map_at_r": 0.83,
                                                          "eer": 0.11, "precision_at_1": 0.9}}
        (tmp_path / "metrics.json").write_text(json.dumps(picked))
        line = summary_line(tmp_path)
        assert name in line and key not in line.split("picked by")[0], line  # named, not raw
