"""Supervised whitening: hand-checkable answers on small synthetic embeddings, and the layer
inside a model surviving a save and a rebuild."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mltrain.model.whitening import Whitening, fit_whitening, max_dims, whitening_candidates


def _two_classes_with_a_nuisance(n: int = 200, seed: int = 0):
    """Two classes apart along axis 0 by 1; axes 1 and 2 are nuisances of spread 10 shared by
    both classes (lighting, pose), axis 3 small noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], n // 2)
    x = np.zeros((n, 4))
    x[:, 0] = labels + rng.normal(0, 0.1, n)
    x[:, 1:3] = rng.normal(0, 10, (n, 2))
    x[:, 3] = rng.normal(0, 0.1, n)
    return x, labels


def test_within_class_scatter_becomes_the_identity():
    x, labels = _two_classes_with_a_nuisance()
    fit = fit_whitening(x, labels, dims=4, shrinkage=0.0)
    z = (x - fit.mean) @ fit.matrix
    centres = np.stack([z[labels == c].mean(0) for c in (0, 1)])
    within = z - centres[labels]
    np.testing.assert_allclose(within.T @ within / len(z), np.eye(4), atol=1e-8)


def test_the_nuisance_axis_stops_deciding_nearest_neighbours():
    x, labels = _two_classes_with_a_nuisance(n=60)
    raw = x / np.linalg.norm(x, axis=1, keepdims=True)
    white = fit_whitening(x, labels, 4, 0.0).apply(x)

    def nn_accuracy(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return float((labels[s.argmax(1)] == labels).mean())

    assert nn_accuracy(raw) < 0.8  # the nuisances' spread swamps the class gap
    assert nn_accuracy(white) == 1.0


def test_output_is_unit_length_and_dims_are_capped_by_the_data():
    x, labels = _two_classes_with_a_nuisance(n=10)
    assert max_dims(10, 2, 4) == 4 and max_dims(10, 9, 4) == 1 and max_dims(3, 3, 8) == 0
    fits = list(whitening_candidates(x, labels, [2, 64], [0.0, 1.0]))
    assert [(f.dims, f.shrinkage) for f in fits] == [(2, 0.0), (2, 1.0), (4, 0.0), (4, 1.0)]
    np.testing.assert_allclose(np.linalg.norm(fits[0].apply(x), axis=1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="no within-class scatter"):
        fit_whitening(x[:2], np.array([0, 1]), 2, 0.1)


def test_shrinkage_pulls_towards_plain_pca():
    x, labels = _two_classes_with_a_nuisance()
    strong = fit_whitening(x, labels, 4, 1e6)
    # with the identity dominating, the map is an orthogonal projection times one scale
    gram = strong.matrix.T @ strong.matrix
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(4), atol=1e-4)


def test_layer_matches_the_fit_and_travels_in_the_state_dict():
    x, labels = _two_classes_with_a_nuisance()
    fit = fit_whitening(x / np.linalg.norm(x, axis=1, keepdims=True), labels, 2, 0.1)
    layer = Whitening.from_fit(fit).double()  # float64, to compare with numpy tightly
    got = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, fit.apply(x), rtol=1e-5, atol=1e-6)
    again = Whitening(4, 2)
    again.load_state_dict(Whitening.from_fit(fit).state_dict())
    assert torch.equal(again.matrix, Whitening.from_fit(fit).matrix)
