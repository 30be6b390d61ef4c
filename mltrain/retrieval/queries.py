"""Query images as a search or a verification receives them: a path that is no image file is
told apart before any model is built, and an image that fails to decode or embed fails
alone, as an error on its own query, while the others are still answered."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np

from mltrain.data.images import load_image
from mltrain.errors import MltrainError
from mltrain.inference.embedder import Embedder


def query_problem(path: Path) -> str | None:
    """What makes `path` no query image before anything reads it (it is missing, or a
    folder), as the end of a sentence that names it; None for a file. The data check's
    advice for an unreadable image in a training folder does not fit a mistyped query."""
    try:
        if path.is_dir():
            return "is a folder; pass image files"
        path.stat()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return "does not exist; check the path"
    return None  # other failures (permissions, not an image) come from decoding it


def readable_queries(paths: list[Path], errors: dict[int, str]) -> list[int]:
    """Positions of the queries that exist as files; the others get their error in
    `errors` now."""
    ok = []
    for i, p in enumerate(paths):
        problem = query_problem(p)
        if problem:
            errors[i] = problem
        else:
            ok.append(i)
    return ok


def embed_queries(embedder: Embedder, paths: list[Path], candidates: list[int],
                  errors: dict[int, str]) -> dict[int, np.ndarray]:  # fmt: skip
    """Embeddings of the `candidates` (positions in `paths`) that decode, in one batch where
    they all embed; one that does not gets its error in `errors` and the rest still embed."""
    ok: list[int] = []
    for i in candidates:
        try:
            load_image(paths[i], 64, "pass an image file (JPEG, PNG, ...)")
            ok.append(i)
        except MltrainError as e:
            errors[i] = str(e)
    embs: dict[int, np.ndarray] = {}
    if not ok:
        return embs
    try:
        batch = embedder.embed([paths[i] for i in ok], desc="embedding queries")
        embs = {i: batch[j] for j, i in enumerate(ok)}
    except MltrainError:  # e.g. an image that decodes but fails the transform: one by one
        for i in ok:
            try:
                embs[i] = embedder.embed([paths[i]], desc="embedding query")[0]
            except MltrainError as e:
                errors[i] = str(e)
    return embs
