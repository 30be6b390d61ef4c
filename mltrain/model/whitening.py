"""Supervised whitening: a linear map fitted in closed form on labelled embeddings.

Pretrained features of a new domain (faces, handwriting) spend most of their variance on what
does not tell classes apart: lighting, pose, stroke width. Whitening the within-class scatter
of the training classes (WCCN; "learned whitening" in Radenović et al., 2018) divides those
directions down, so cosine similarity weighs what separates identities. It needs no gradient
steps, only the training side's embeddings, and unseen classes benefit because the nuisance
directions are shared across classes. Shrinkage towards the identity keeps it stable when
there are few images per class.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class WhiteningFit:
    """A fitted map `(x - mean) @ matrix`, `matrix` of shape (input dims, output dims)."""

    mean: np.ndarray
    matrix: np.ndarray
    dims: int
    shrinkage: float

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened, unit-length rows (retrieval compares them by cosine)."""
        z = (np.asarray(x, np.float64) - self.mean) @ self.matrix
        return (z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)).astype(
            np.float32
        )


def max_dims(rows: int, classes: int, width: int) -> int:
    """The most output dimensions the within-class scatter of `rows` images of `classes`
    classes can estimate: it has rank at most rows - classes."""
    return max(0, min(width, rows - classes))


def fit_whitening(x: np.ndarray, labels: np.ndarray, dims: int, shrinkage: float) -> WhiteningFit:
    """PCA of the training embeddings to `dims`, then whitening of the within-class scatter in
    that space, with `shrinkage` (a fraction of the mean eigenvalue) added to its diagonal.

    `x` are the training side's (normalised) embeddings, `labels` their classes; at least two
    images of some class are needed for a within-class scatter."""
    return next(whitening_candidates(x, labels, [dims], [shrinkage]))


def whitening_candidates(
    x: np.ndarray, labels: np.ndarray, dims: list[int], shrinkages: list[float]
) -> Iterator[WhiteningFit]:
    """`fit_whitening` for every pair of `dims` (each capped by `max_dims`) and `shrinkages`,
    sharing one PCA: the fits a validation set chooses between."""
    x = np.asarray(x, np.float64)
    classes, inverse = np.unique(np.asarray(labels), return_inverse=True)
    most = max_dims(len(x), len(classes), x.shape[1])
    if most < 1:
        raise ValueError(f"{len(x)} images of {len(classes)} classes: no within-class scatter")
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    centred = x - mean
    for d in sorted({min(d, most) for d in dims}):
        pca = vt[:d].T
        z = centred @ pca
        centres = np.zeros((len(classes), d))
        np.add.at(centres, inverse, z)
        within = z - (centres / np.bincount(inverse)[:, None])[inverse]
        scatter = within.T @ within / len(z)
        for shrinkage in shrinkages:
            reg = scatter + shrinkage * np.trace(scatter) / d * np.eye(d)
            values, vectors = np.linalg.eigh(reg)
            matrix = pca @ (vectors / np.sqrt(np.maximum(values, 1e-12)))
            yield WhiteningFit(mean=mean, matrix=matrix, dims=d, shrinkage=shrinkage)


class Whitening(nn.Module):
    """A fitted whitening inside the model, so that every path that embeds (export, ONNX,
    OpenVINO, search, serve) applies it. Its buffers travel in the state dict."""

    def __init__(self, width: int, dims: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("matrix", torch.zeros(width, dims))

    @classmethod
    def from_fit(cls, fit: WhiteningFit) -> Whitening:
        layer = cls(*fit.matrix.shape)
        layer.mean.copy_(torch.from_numpy(fit.mean))
        layer.matrix.copy_(torch.from_numpy(fit.matrix))
        return layer

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        # fp32 even under bf16 autocast: the map scales directions by up to 1/sqrt of small
        # eigenvalues, which bf16's 8 bits of mantissa would turn into noise
        with torch.autocast(emb.device.type, enabled=False):
            return F.normalize((emb.float() - self.mean) @ self.matrix, dim=1)
