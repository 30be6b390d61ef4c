"""Exporting a search bundle: embed a run's images, build the index, write every file and
the manifest into a staging folder, and swap it into place (format: `mltrain.retrieval.bundle`)."""

from __future__ import annotations

import copy
import os
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mltrain.config import ExportConfig, to_dict
from mltrain.data.pipeline import RunData, prepare_data
from mltrain.errors import ConfigError
from mltrain.inference.embedder import Embedder
from mltrain.retrieval.bundle import (
    ARRAY_FORMAT,
    EMBEDDINGS,
    METADATA,
    MODEL,
    ONNX,
    SHARDED_FORMAT,
)
from mltrain.retrieval.bundle_write import (
    check_export_target,
    clean_stale,
    finish_manifest,
    move_into_place,
    replaced_index,
    save_state_dict,
    shard_entries,
    staged,
    versions,
    write_metadata,
)
from mltrain.retrieval.gallery import Gallery, build_gallery, check_gallery, retire_replaced
from mltrain.retrieval.index_types import INDEX_TYPES, check_index_args
from mltrain.retrieval.shards import (
    ShardReader,
    ShardWriter,
    training_rows,
)
from mltrain.retrieval.verify import calibrate, calibration_rows


def _splits_of(data) -> list[str]:
    """Each image's side of the run's split: train, val (the validation classes, which chose
    best.pt and its whitening), heldout (the test side), copy (a byte-identical copy that
    evaluation left out), or all for split kind none. Only heldout rows calibrate: validation
    classes would promise a FAR the test side misses, and a copy is a perfect genuine pair."""
    n = len(data.folder)
    if data.split.kind == "none":
        return ["all"] * n
    out = ["copy"] * n
    for side, rows in (("train", data.split.train), ("val", data.split.val),
                       ("heldout", data.split.heldout)):  # fmt: skip
        for i in rows:
            out[int(i)] = side
    return out


def export_bundle(
    embedder: Embedder,
    out_dir: str | os.PathLike,
    source: str,
    index: str | None = None,
    pca_dim: int | None = None,
    dtype: str | None = None,
    shard_size: int | None = None,
    data: RunData | None = None,
    rerank: dict[str, Any] | None = None,
    onnx: bool = False,
) -> Path:
    """Embed the whole image folder of `embedder.cfg.data` and write a bundle to `out_dir`.

    `data` is that folder already scanned and checked (`prepare_data`), to avoid a second pass.
    `rerank` is the evaluator's re-ranking comparison of these held-out images: its
    recommendation becomes the bundle's default re-ranker for search.

    `index`, `pca_dim`, `dtype` and `shard_size` default to the config's `export` section;
    the index args come from `export.index_args` when `index` is the configured kind, else
    the kind's defaults apply; `auto` becomes hnsw or ivf_hnsw by the folder's size
    (`resolve_index`). A folder of more than `shard_size` images is written as
    shards (see the module docstring). With `onnx`, the model is also written as model.onnx,
    first of all: a graph that fails its parity check stops the export before any image is
    embedded, and no bundle is written. Returns `out_dir`.
    """
    cfg = copy.deepcopy(embedder.cfg)
    exp = cfg.export
    kind = index or exp.index
    if kind != exp.index:
        exp.index_args = {}  # args written for another index type do not fit this one
    pca = exp.pca_dim if pca_dim is None else pca_dim
    dtype = dtype or exp.dtype
    if dtype not in ("float32", "float16"):
        raise ConfigError(f"export dtype {dtype!r} is not one of float32, float16")
    exp.index, exp.pca_dim, exp.dtype = kind, pca, dtype  # the manifest's config says what ran
    if shard_size is not None:
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"export shard_size must be a positive row count, not {shard_size!r}")
        exp.shard_size = shard_size
    metric = cfg.eval.metric
    out_dir = Path(out_dir)
    clean_stale(out_dir)  # killed writers' folders go first, whatever happens next
    check_export_target(out_dir)
    if not onnx and (out_dir / ONNX).is_file():
        print(f"note: the bundle at {out_dir} has a model.onnx that this export (without "
              "--onnx) does not write again; search will embed with torch", file=sys.stderr)

    data = data or prepare_data(cfg)
    folder = data.folder
    if note := check_export_index(exp, len(folder), embedder.model.embedding_dim, metric):
        print(f"note: {note}", file=sys.stderr)
    # the manifest and the bundle's config name the kind built, never auto
    exp.index = kind = resolve_index(exp.index, exp.index_args, len(folder))
    splits = _splits_of(data)
    rows = [
        {
            "path": p.relative_to(folder.root).as_posix(),
            "label": int(lab),
            "class": folder.classes[int(lab)],
            "split": s,
        }
        for p, lab, s in zip(folder.paths, folder.labels, splits, strict=True)
    ]
    head = embedder.model.head
    with staged(out_dir, "partial") as tmp:
        check_export_target(out_dir)  # again, locked: an `add` may have ended while we waited
        onnx_record = _write_onnx(embedder, folder.paths, tmp) if onnx else None
        if onnx:  # OpenVINO, where it embeds, compiles this graph rather than a trace
            embedder = replace(embedder, graph=(tmp / ONNX).read_bytes())
        idx, dim, shards = _write_embeddings(
            embedder, folder.paths, folder.labels, [r["path"] for r in rows], tmp, out_dir, exp,
            metric,
        )
        manifest = {
            "format_version": SHARDED_FORMAT if shards else ARRAY_FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source,
            "versions": versions(),
            "config": to_dict(cfg),
            "image_root": str(folder.root.resolve()),
            "classes": list(folder.classes),
            "metric": metric,
            "embedding_dim": dim,
            "count": len(rows),
            "dtype": dtype,
            "num_classes": int(head.out_features) if head is not None else 0,
            "split_kind": data.split.kind,
        }
        if shards:
            manifest["shards"] = shards
        if onnx_record is not None:
            manifest["onnx"] = onnx_record
        if rerank is not None:
            manifest["rerank"] = {"default": rerank["recommended"], "measured": rerank}
        calibration = _calibration(tmp, shards, folder.labels, splits, cfg)
        if calibration is not None:
            manifest["verification"] = calibration
        write_metadata(tmp / METADATA, rows)
        try:
            idx.save(tmp)
            save_state_dict(embedder.model, tmp / MODEL)
            finish_manifest(tmp, manifest, kind, exp.index_args, pca, idx)
        finally:
            idx.close()  # a database lets go of its files before the folder moves
        replaced = replaced_index(out_dir)  # under the lock: the bundle this swap replaces
        move_into_place(tmp, out_dir)
    if line := retire_replaced(replaced, manifest["index"]):  # its server collection, say
        print(line, file=sys.stderr)
    return out_dir


PROBE_IMAGES = 8


def _write_onnx(embedder: Embedder, paths: list[Path], tmp: Path) -> dict[str, Any]:
    """model.onnx in `tmp`, checked on up to `PROBE_IMAGES` gallery images spread over
    the folder; the manifest's record of the check."""
    from mltrain.inference.onnx import export_checked

    step = max(1, len(paths) // PROBE_IMAGES)
    probe_paths = paths[::step][:PROBE_IMAGES]
    probe = torch.cat([x for x, _, _ in embedder._loader(probe_paths, None)])
    graph, parity = export_checked(embedder.model, probe, "gallery")
    (tmp / ONNX).write_bytes(graph)
    return parity.record()


def _calibration(tmp: Path, shards, labels: np.ndarray, splits: list[str], cfg) -> dict | None:
    """Verification thresholds from the stored held-out rows (`mltrain.retrieval.verify`)."""
    rows, source = calibration_rows(splits)
    if shards:
        emb = ShardReader([tmp / s["name"] for s in shards]).take(rows)
    else:
        emb = np.load(tmp / EMBEDDINGS, mmap_mode="r", allow_pickle=False)[rows]
    e = cfg.eval
    return calibrate(emb, labels[rows], e.metric, e.verification_pairs, cfg.seed, source)


def bundle_bytes(embedder: Embedder, rows: int, onnx: bool = False) -> int:
    """A rough upper estimate of a bundle's size, for the free-space check before embedding:
    embeddings, metadata and index per row, plus the weights (twice with `onnx`: model.onnx
    holds them again)."""
    weights = sum(t.numel() * t.element_size() for t in embedder.model.state_dict().values())
    dim = embedder.model.embedding_dim
    return rows * (dim * 8 + 512) + weights * (2 if onnx else 1)


AUTO = "auto"  # export.index: the kind is chosen by the gallery's size
# From this many gallery rows `auto` builds ivf_hnsw, below it hnsw. At a million 128-d vectors
# ivf_hnsw answers one query in 40-50 µs at recall@10 0.96-0.97 and builds in under a minute
# after its k-means, where hnsw takes many minutes to build; below about half a million rows a
# flat scan of the list centroids is cheap, the gain small, and hnsw stands (docs/performance.md,
# "One query against a million vectors").
AUTO_IVF_HNSW_ROWS = 500_000


def resolve_index(kind: str, args: Any, rows: int) -> str:
    """The index kind an export of `rows` images builds: `kind` itself, or for `auto` hnsw
    below `AUTO_IVF_HNSW_ROWS` rows and ivf_hnsw from there on (args need a named kind)."""
    if kind != AUTO:
        return kind
    if args:
        raise ConfigError("export.index_args need a named export.index (auto picks hnsw or "
                          "ivf_hnsw by gallery size)")  # fmt: skip
    return "ivf_hnsw" if rows >= AUTO_IVF_HNSW_ROWS else "hnsw"


def check_export_index(exp: ExportConfig, rows: int, dim: int, metric: str) -> str | None:
    """Refuse index settings the gallery cannot train before any image is embedded; unset
    sizes (IVF lists, PQ codes) are fitted to the rows, and `auto` resolved for them.
    Returns a note where data is thin, which the export prints (the commands' early checks
    run this too, and stay quiet)."""
    kind = resolve_index(exp.index, exp.index_args, rows)
    name = f"{AUTO} ({kind})" if kind != exp.index else kind
    if kind in INDEX_TYPES:  # an unknown kind is named below, with the valid ones
        check_index_args(kind, exp.index_args, "export.index_args")
    sharded = rows > exp.shard_size  # trained on a sample of the shards, else on every row
    n_train = training_rows(rows, exp.index_args.get("nlist")) if sharded else rows
    try:
        note = check_gallery(kind, exp.index_args, rows, n_train, dim, metric, exp.pca_dim)
    except ConfigError as e:
        raise ConfigError(f"export.index {name} for {rows} images: {e}") from None
    return f"export index {name}: {note}" if note else None


def _write_embeddings(
    embedder: Embedder,
    paths: list[Path],
    labels: np.ndarray,
    rel_paths: list[str],
    tmp: Path,
    out_dir: Path,
    exp: ExportConfig,
    metric: str,
) -> tuple[Gallery, int, list[dict[str, Any]] | None]:
    """Embed `paths` into `tmp` and build the gallery: (gallery, dim, shard entries or None).

    Up to `exp.shard_size` images: one embeddings.npy and an index built in memory. More:
    shards filled batch by batch and an index trained on a sample of them and filled shard
    by shard, so memory holds one shard (plus the index), never the gallery. The index is
    then built from the stored rows, so with float16 it sees float16-rounded vectors.
    """
    if len(paths) <= exp.shard_size:
        emb = embedder.embed(paths, labels, desc="bundle embeddings")
        idx = build_gallery(exp.index, exp.index_args, exp.pca_dim, metric, emb, labels,
                            rel_paths, tmp, out_dir)  # fmt: skip
        np.save(tmp / EMBEDDINGS, emb.astype(exp.dtype), allow_pickle=False)
        return idx, int(emb.shape[1]), None
    writer = ShardWriter(tmp, len(paths), exp.shard_size, exp.dtype)
    for batch in embedder.embed_batches(paths, labels, desc="bundle embeddings"):
        writer.write(batch)
    written = writer.close()
    reader = ShardReader([tmp / s.name for s in written])
    idx = build_gallery(exp.index, exp.index_args, exp.pca_dim, metric, reader, labels,
                        rel_paths, tmp, out_dir)  # fmt: skip
    return idx, reader.shape[1], shard_entries(tmp, written)

