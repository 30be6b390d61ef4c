"""One-shot verification with a bundle: are these two images the same class (person, product)?

A similarity alone does not answer that; a threshold does, and it has to come from data. At
export the bundle's held-out rows (all rows for a split of kind `none`) give genuine and
impostor pairs, and for each false-accept rate in `FARS` the lowest threshold that keeps to
it is stored in the manifest with what it reaches on those pairs. `verify` and
`search --threshold auto` read it back; nothing is re-embedded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mltrain.data.images import load_image
from mltrain.errors import BundleError, ConfigError, DataError
from mltrain.retrieval.pairs import calibrate_threshold, distinct_pairs, pair_scores, sample_pairs
from mltrain.retrieval.queries import query_problem

FARS = (1e-1, 1e-2, 1e-3, 1e-4)
DEFAULT_FAR = 1e-3


def calibration_rows(splits: Sequence[str]) -> tuple[np.ndarray, str]:
    """Rows whose pairs calibrate: the held-out ones, else (split none) every row."""
    held = np.flatnonzero(np.asarray(splits) == "heldout")
    if len(held):
        return held, "heldout"
    return np.arange(len(splits)), "all"


def calibrate(
    emb: np.ndarray, labels: np.ndarray, metric: str, num_pairs: int, seed: int, source: str
) -> dict[str, Any] | None:
    """The manifest's `verification` entry for these rows, or None where they give no
    genuine or no impostor pair (then the bundle verifies nothing)."""
    labels = np.asarray(labels)
    genuine, impostor = distinct_pairs(labels)
    if not genuine or not impostor:
        return None
    i, j, same = sample_pairs(labels, num_pairs, seed)
    scores = pair_scores(np.asarray(emb, dtype=np.float32), i, j, metric)
    table = [calibrate_threshold(same, scores, far) for far in FARS]
    for row in table:  # fewer impostors than 1/FAR: no false accept is allowed, a stricter test
        row["resolved"] = _resolves(row["impostor_pairs"], row["far"])
    return {"metric": metric, "rows": source, "classes": int(np.unique(labels).size),
            "thresholds": table}  # fmt: skip


def threshold_for(
    manifest: dict[str, Any], far: float = DEFAULT_FAR, name: str = "--far"
) -> dict[str, Any]:
    """The stored calibration at `far`; a one-line error where the bundle has none. `name`
    is how the user gave the FAR (the command line's `--far`, the server's `far`)."""
    cal = manifest.get("verification")
    if not isinstance(cal, dict) or not isinstance(cal.get("thresholds"), list):
        raise BundleError(
            "this bundle holds no calibrated threshold; export it again with "
            "`python -m mltrain export` (or evaluate.py --export), which calibrates one"
        )
    for row in cal["thresholds"]:
        if isinstance(row, dict) and abs(float(row.get("far", -1)) - far) <= 1e-12:
            return {**row, "rows": cal.get("rows", "heldout"), "classes": cal.get("classes")}
    have = ", ".join(f"{float(r['far']):g}" for r in cal["thresholds"] if isinstance(r, dict))
    raise ConfigError(f"{name} {far:g}: the bundle is calibrated at FAR {have}; choose one")


def is_resolved(cal: dict[str, Any]) -> bool:
    """Whether enough impostor pairs back the stored threshold to measure its FAR (at least
    1 / FAR of them). Bundles from before the `resolved` flag are judged from their counts;
    a row that says neither is taken as resolved (nothing to warn about)."""
    flag = cal.get("resolved")
    if isinstance(flag, bool):
        return flag
    try:
        return _resolves(int(cal["impostor_pairs"]), float(cal["far"]))
    except (KeyError, TypeError, ValueError):
        return True


def _resolves(impostor_pairs: int, far: float) -> bool:
    """At least 1 / FAR impostor pairs: one false accept among them is within the FAR."""
    return impostor_pairs * far >= 1


FEW_CLASSES = 5  # a threshold calibrated on fewer held-out classes is noted as approximate


def calibration_note(cal: dict[str, Any]) -> str | None:
    """One line for a threshold that rests on too few impostor pairs to resolve its FAR (it
    then only keeps every one of them out, a stricter and noisier cut), or on the held-out
    images of a few classes (a class_disjoint split of a small folder), else None."""
    try:  # the manifest is untrusted: a row too odd to describe gets no note
        far, pairs = float(cal["far"]), int(cal["impostor_pairs"])
    except (KeyError, TypeError, ValueError):
        return None
    classes = cal.get("classes")
    few = isinstance(classes, int) and not isinstance(classes, bool) and classes < FEW_CLASSES
    resolved = is_resolved(cal)
    if not 0 < far < 1 or (resolved and not few):
        return None
    why = [] if resolved else [
        f"only {pairs:,} impostor pairs (needs >= {math.ceil(1 / far - 1e-9):,} to resolve it)"]
    rows = "held-out images" if cal.get("rows", "heldout") == "heldout" else "images"
    why += [f"the {rows} of only {classes} classes"] if few else []
    return f"threshold for FAR {far:g} rests on {' and '.join(why)}; treat it as approximate"


def check_pair_paths(*paths: str | Path) -> None:
    """A missing image or a folder stops verification with one line, before the bundle is
    read (a stat each: cheap enough to check again in `verify_pair`)."""
    for path in paths:
        problem = query_problem(Path(path))
        if problem:
            raise DataError(f"image {path} {problem}")


def pair_verdict(emb: np.ndarray, metric: str, cal: dict[str, Any]) -> tuple[float, bool]:
    """Similarity of the two rows of `emb` and whether it reaches `cal`'s threshold: the one
    rule behind `mltrain verify` and the server's /verify."""
    score = float(pair_scores(emb, np.array([0]), np.array([1]), metric)[0])
    return score, score >= float(cal["threshold"])


def verify_pair(bundle: Any, a: str | Path, b: str | Path, far: float = DEFAULT_FAR) -> dict:
    """Similarity of images `a` and `b` under the bundle's model and metric, against its
    threshold at `far`: {'similarity', 'threshold', 'same', ...calibration}. A file that is
    no image is refused before the model is built (a decode at a reduced scale)."""
    from mltrain.retrieval.bundle_model import bundle_embedder  # the model: only when used

    cal = threshold_for(bundle.manifest, far)  # before the model is built
    check_pair_paths(a, b)
    for path in (a, b):
        load_image(path, 64, "pass an image file (JPEG, PNG, ...)")
    emb = bundle_embedder(bundle).embed([Path(a), Path(b)], desc="embedding the pair")
    score, same = pair_verdict(emb, bundle.metric, cal)
    return {**cal, "similarity": score, "same": same}
