"""Vectors for the ANN benchmark: a synthetic clustered mixture, or exported embeddings split
into base and queries (see benchmarks/ann.py)."""

from __future__ import annotations

import time
from pathlib import Path

import faiss
import numpy as np

K = 10  # neighbours searched and scored (recall@K)




def normalize(x: np.ndarray) -> np.ndarray:
    """A unit-length float32 copy (never in place: `x` may be a read-only memory map)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss.normalize_L2(x)
    return x


def clustered(
    n: int, dim: int, n_queries: int, clusters: int, intrinsic: int, spread: float = 1.0,
    groups: int = 0, group_spread: float = 0.7, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Base and query vectors from one mixture of Gaussian clusters (unit length).

    With `groups`, cluster centres scatter around that many group centres (similar classes
    lie near each other in real embedding spaces) instead of being independent.
    """
    rng = np.random.default_rng(seed)
    intrinsic = min(intrinsic, dim)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    if groups:
        tops = rng.standard_normal((groups, dim), dtype=np.float32)
        centres = tops[rng.integers(groups, size=clusters)] + group_spread * centres
    scales = rng.uniform(0.5, 1.5, clusters).astype(np.float32)  # tight and loose clusters
    weights = rng.dirichlet(np.full(clusters, 2.0))  # unequal cluster sizes

    def draw(count: int, rng: np.random.Generator) -> np.ndarray:
        ids = rng.choice(clusters, size=count, p=weights)
        out = np.empty((count, dim), dtype=np.float32)
        order = np.argsort(ids, kind="stable")
        bounds = np.searchsorted(ids[order], np.arange(clusters + 1))
        for c in range(clusters):
            rows = order[bounds[c] : bounds[c + 1]]
            if len(rows) == 0:
                continue
            basis_rng = np.random.default_rng([seed, c])  # the same subspace for base and queries
            basis = basis_rng.standard_normal((intrinsic, dim), dtype=np.float32)
            basis /= np.sqrt(intrinsic)
            z = rng.standard_normal((len(rows), intrinsic), dtype=np.float32)
            noise = rng.standard_normal((len(rows), dim), dtype=np.float32) * 0.15
            out[rows] = centres[c] + spread * scales[c] * ((z @ basis) * 0.9 + noise)
        return out

    base = normalize(draw(n, rng))
    queries = normalize(draw(n_queries, np.random.default_rng(seed + 1)))
    where = f"around {groups} group centres" if groups else "independent"
    desc = (
        f"synthetic: {n:,} x {dim} float32, mixture of {clusters:,} Gaussian clusters (centres "
        f"{where}, per-cluster scale 0.5-1.5, spread in a {intrinsic}-d subspace per cluster "
        f"plus isotropic noise, Dirichlet cluster sizes), L2-normalised, cosine; {n_queries:,} "
        "queries drawn from the same mixture, not in the base"
    )
    return base, queries, desc


def from_embeddings(x: np.ndarray, n_queries: int, name: str, seed: int = 0):
    x = normalize(np.asarray(x, dtype=np.float32))
    n_q = min(n_queries, max(1, len(x) // 10))
    perm = np.random.default_rng(seed).permutation(len(x))
    queries, base = x[perm[:n_q]], x[perm[n_q:]]
    if len(base) < K:
        raise SystemExit(f"{name}: {len(x)} embeddings are too few to measure recall@{K}")
    desc = (
        f"{name}: {len(base):,} x {x.shape[1]} embeddings (L2-normalised, cosine); {n_q:,} "
        "randomly chosen embeddings are the queries and are left out of the base"
    )
    return np.ascontiguousarray(base), np.ascontiguousarray(queries), desc


def load_inputs(args) -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    sets = []
    if args.bundle:
        from mltrain.retrieval.bundle import load_bundle

        b = load_bundle(args.bundle)
        if b.metric != "cosine":
            print(f"note: bundle metric is {b.metric}; this benchmark searches by cosine")
        name = f"bundle {args.bundle}"
        sets.append((name, *from_embeddings(np.asarray(b.embeddings), args.queries, name)))
    if args.embeddings:
        x = np.load(args.embeddings, allow_pickle=False, mmap_mode="r")
        if x.ndim != 2:
            raise SystemExit(f"{args.embeddings}: expected a 2-D array, got shape {x.shape}")
        name = f"embeddings {Path(args.embeddings).name}"
        sets.append((name, *from_embeddings(x, args.queries, name)))
    if args.synthetic:
        clusters = args.clusters or int(np.clip(args.synthetic // 250, 2, 4000))
        t = time.perf_counter()
        base, queries, desc = clustered(args.synthetic, args.dim, args.queries, clusters,
                                        args.intrinsic_dim, args.spread, args.groups)  # fmt: skip
        print(f"generated the synthetic set in {time.perf_counter() - t:.1f} s")
        sets.append((f"synthetic {args.synthetic:,}x{args.dim}", base, queries, desc))
    return sets
