"""Unit-length embedding rows: the one normalisation that cosine search, ensembles and the
t-SNE picture share, so that they agree on what a zero row means (it stays zero)."""

from __future__ import annotations

import numpy as np


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Float32 copy with unit-length rows; all-zero rows stay zero instead of becoming NaN."""
    x = np.array(x, dtype=np.float32, copy=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x
