"""Search bundles: a self-contained, pickle-free folder that answers image queries.

A bundle holds everything a search needs and nothing that executes code when loaded:

    embeddings.npy   float32 or float16 rows, one per image (read with allow_pickle=False)
    metadata.csv     path (relative to the image root), label, class, split; one row per image
    index.faiss      the Faiss index over the embeddings (PCA inside it when pca_dim is set);
                     a Milvus bundle (`export.index=milvus`) has none: its manifest's index
                     names the backend, URI and collection, and Milvus Lite's folder is
                     gallery.db in the bundle (`mltrain.retrieval.milvus`, not hashed)
    model.pt         the embedding model's state_dict: tensors only (torch.load weights_only)
    model.onnx       optional (`export --onnx`): the same model as an fp32 ONNX graph for
                     onnxruntime, hashed like the others; the manifest's "onnx" entry
                     records its parity check (worst cosine vs PyTorch, probe size, opset,
                     onnxruntime version)
    manifest.json    versions, the full config, image_root, metric, sizes and the sha256 of
                     every other file

Galleries of more than `export.shard_size` images store their embeddings as shards instead
of one embeddings.npy (`embeddings-00000.npy`, ...; bundle format 2): they are written through
memory maps batch by batch, the index is trained on an even sample of them and filled shard
by shard, so neither export nor loading holds the whole gallery in memory. The manifest lists
each shard's name, rows and sha256 under "shards"; `Bundle.embeddings` is then a
`mltrain.retrieval.shards.ShardReader` (array-like, read through mmap).

`load_bundle` checks every file against the manifest before using any of them, so a
truncated, edited or mismatched file is a `BundleError` that names it, never a wrong answer.
Bundles also come from other people, so everything in one is untrusted: every file must be a
regular file that resolves inside the bundle (`mltrain.files.inside`), `images/` a real
folder, the image root no file-system root, system or home folder, class names strings
(printed escaped), and model.pt must fit the config before that model is built
(`mltrain.retrieval.bundle_model`). Writers swap a complete new folder into place
(`mltrain.retrieval.bundle_write`); where the system has no atomic exchange, the next load
puts the old bundle back.

Rows of images added later with `add_images` that lie outside the image root are copied into
the bundle's own `images/` folder; their metadata path reads `bundle:images/<class>/<file>`.
`safe_image_path` resolves both kinds and refuses anything that escapes its root.
"""

from __future__ import annotations

import copy
import csv
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import faiss
import numpy as np

from mltrain import files
from mltrain.config import from_dict
from mltrain.data.folder import is_image, sniff_image
from mltrain.errors import BundleError, ConfigError
from mltrain.inference.embedder import Embedder
from mltrain.model.checkpoint import for_this_machine
from mltrain.retrieval.gallery import INDEX, Gallery, hashed_files, open_gallery
from mltrain.retrieval.shards import SHARD_NAME, ShardReader

ARRAY_FORMAT = 1  # embeddings in one embeddings.npy
SHARDED_FORMAT = 2  # embeddings in the shards that the manifest lists
FORMATS = (ARRAY_FORMAT, SHARDED_FORMAT)
MANIFEST = "manifest.json"
EMBEDDINGS = "embeddings.npy"
METADATA = "metadata.csv"
MODEL = "model.pt"
ONNX = "model.onnx"  # optional; hashed in "files" when present
DATA_FILES = (EMBEDDINGS, METADATA, INDEX, MODEL)  # hashed in the manifest's "files"
SHARDED_DATA_FILES = (METADATA, INDEX, MODEL)  # shards are hashed in its "shards" list
COLUMNS = ("path", "label", "class", "split")
IMAGES_DIR = "images"  # copies of added images that lie outside the image root
BUNDLE_PREFIX = "bundle:"  # metadata paths under the bundle folder rather than the image root
_REQUIRED_KEYS = ("format_version", "config", "metric", "embedding_dim", "count", "dtype",
                  "index", "files", "image_root", "classes")  # fmt: skip
REEXPORT = "re-export the bundle (python -m mltrain export --checkpoint ... --out DIR)"
REEXPORT_ONNX = "re-export the bundle with --onnx (python -m mltrain export ... --onnx)"
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest of a million classes is about 50 MB
MAX_MANIFEST_DEPTH = 64  # an export writes about 6 levels (config sections, their arguments)
# Records that nothing reads back, only people: re-ranking measured on few queries may be NaN.
INFORMATIONAL = ("rerank.measured",)
FINITE_CHUNK_ROWS = 65536  # embeddings checked for NaN this many rows at a time (mmap pages)


@dataclass
class Bundle:
    """A validated bundle: `embeddings` is a read-only memory map (a `ShardReader` over
    memory-mapped shards for a sharded bundle), `root` the image root."""

    path: Path
    manifest: dict[str, Any]
    embeddings: np.ndarray | ShardReader
    metadata: list[dict[str, Any]]
    gallery: Gallery  # where its vectors are searched: index.faiss, or a Milvus collection
    root: Path
    _embedder: Embedder | None = field(default=None, repr=False)
    _onnx_embedder: Embedder | None = field(default=None, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)

    @property
    def index(self) -> faiss.Index:
        """The Faiss index of a Faiss bundle (others are searched through `gallery`)."""
        index = getattr(self.gallery, "index", None)
        if index is None:
            raise BundleError(f"{self.path} keeps its gallery in {self.gallery.backend}, not "
                              "in a Faiss index; search it through bundle.gallery")  # fmt: skip
        return index

    @property
    def has_onnx(self) -> bool:
        """The bundle holds a checked model.onnx (exported with --onnx)."""
        return ONNX in self.manifest["files"]

    @property
    def metric(self) -> str:
        return self.manifest["metric"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    def __len__(self) -> int:
        return len(self.metadata)

    def rows_of_class(self, label: int) -> np.ndarray:
        """The metadata rows of class `label` (labels read once; enrolment appends rows)."""
        if self._labels is None or len(self._labels) != len(self.metadata):
            self._labels = np.array([r["label"] for r in self.metadata], np.int64)
        return np.flatnonzero(self._labels == label)


def is_bundle_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path.is_dir() and not any(path.iterdir()))


def _read_metadata(path: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise BundleError(
                f"{path}: expected the columns {', '.join(COLUMNS)}, got {header}; {REEXPORT}"
            )
        for n, rec in enumerate(reader, start=2):
            if len(rec) != len(COLUMNS):
                raise BundleError(f"{path} line {n}: expected {len(COLUMNS)} fields; {REEXPORT}")
            try:
                label = int(rec[1])
            except ValueError:
                raise BundleError(f"{path} line {n}: label {rec[1]!r} is not an integer") from None
            rows.append({"path": rec[0], "label": label, "class": rec[2], "split": rec[3]})
    return rows


def _unsafe_reason(rel: str) -> str | None:
    """Why the metadata path `rel` could point outside its root (lexically), or None."""
    if not rel:
        return "empty path"
    inner = rel[len(BUNDLE_PREFIX) :] if rel.startswith(BUNDLE_PREFIX) else rel
    if "\x00" in inner:
        return "NUL byte"
    if inner.startswith(("/", "\\")) or PurePosixPath(inner).is_absolute() or (
        len(inner) > 1 and inner[1] == ":"
    ):
        return "absolute path"
    if ".." in inner.replace("\\", "/").split("/"):
        return "'..' component"
    if rel.startswith(BUNDLE_PREFIX):
        if not inner.startswith(IMAGES_DIR + "/"):
            return f"a {BUNDLE_PREFIX} path must name a file under {IMAGES_DIR}/"
    return None


def bundle_file(folder: Path, name: str) -> Path:
    """`folder/name` as a regular file inside the bundle. A symlink out of the bundle is
    refused before anything is read, and so are FIFOs and devices (reading one hangs)."""
    path = folder / name
    if not (path.exists() or path.is_symlink()):
        raise BundleError(f"{path} is missing; the bundle is incomplete: {REEXPORT}")
    files.inside(folder, name, BundleError, f"bundle file {path}")
    if not files.is_regular(path):
        raise BundleError(f"{path} is not a regular file; {REEXPORT}")
    return path


def recover(path: Path) -> None:
    """A kill between the two renames of a swap left no bundle at `path`: put the old one back."""
    if path.exists() or path.is_symlink():
        return
    try:
        restored = files.recover_dir(path, lambda p: (p / MANIFEST).is_file())
    except OSError as e:
        raise BundleError(
            f"search bundle {path} is missing and its previous version beside it could not be "
            f"put back ({e.strerror or e}); rename the newest .{path.name}.old-* folder to "
            f"{path.name}"
        ) from None
    if restored is not None:
        print(f"note: {path} was missing after an interrupted write; restored the previous "
              f"bundle from {restored.name} (repeat the interrupted --add)",
              file=sys.stderr)  # fmt: skip


def _not_a_bundle(path: Path, why: str, checkpoint: object) -> BundleError:
    return BundleError(f"{path} {why}; export one first: python -m mltrain export --checkpoint "
                       f"{checkpoint} --out BUNDLE")  # fmt: skip


def read_manifest(path: Path) -> dict[str, Any]:
    recover(path)
    mpath = path / MANIFEST
    if path.is_file() and path.suffix in (".pt", ".pth", ".ckpt"):
        raise _not_a_bundle(path, "is a checkpoint, not a search bundle", path)
    if not path.is_dir():
        raise BundleError(f"search bundle {path} is not a folder; pass the folder that holds "
                          f"{MANIFEST}")  # fmt: skip
    if not mpath.exists():
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            raise _not_a_bundle(path, "is a training run, not a search bundle", path)
        if not any((path / name).exists() for name in (*DATA_FILES, ONNX)):
            raise _not_a_bundle(path, f"holds no search bundle (no {MANIFEST})",
                                "RUN/checkpoints/best.pt")
        raise BundleError(f"{mpath} is missing: {path} is not a complete bundle; {REEXPORT}")
    bundle_file(path, MANIFEST)
    manifest = files.read_json(mpath, BundleError, MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH,
                               REEXPORT)  # fmt: skip
    if not isinstance(manifest, dict):
        raise BundleError(f"{mpath} does not hold a JSON object; {REEXPORT}")
    missing = [k for k in _REQUIRED_KEYS if k not in manifest]
    if missing:
        raise BundleError(f"{mpath} lacks the keys {missing}; {REEXPORT}")
    types = {"files": dict, "index": dict, "classes": list, "count": int, "embedding_dim": int,
             "config": dict, "image_root": str, "metric": str, "dtype": str}  # fmt: skip
    wrong = [k for k, t in types.items() if not isinstance(manifest[k], t)]
    if not all(isinstance(c, str) for c in manifest["classes"]):
        wrong.append("classes")
    if wrong:
        raise BundleError(f"{mpath}: malformed entries {wrong}; {REEXPORT}")
    if manifest["format_version"] not in FORMATS:
        raise BundleError(
            f"{mpath}: bundle format {manifest['format_version']} is not supported by this "
            f"mltrain (formats {', '.join(map(str, FORMATS))}); {REEXPORT}"
        )
    _check_shard_list(mpath, manifest)
    bad = files.nonfinite_key(manifest, skip=INFORMATIONAL)
    if bad is not None:
        raise BundleError(f"{mpath}: {bad} is not a finite number (NaN or infinity); {REEXPORT}")
    _check_verification(mpath, manifest.get("verification"))
    _check_index_args(mpath, manifest["index"].get("args"))
    return manifest


def _check_index_args(mpath: Path, args: Any) -> None:
    """The search parameters a load applies (`_apply_search_params`) are counts."""
    if args is None:
        return
    if not isinstance(args, dict):
        raise BundleError(f"{mpath}: index.args is not a mapping; {REEXPORT}")
    for key in ("ef_search", "nprobe"):
        value = args.get(key)
        if key in args and (type(value) is not int or not 1 <= value <= 2**31 - 1):
            raise BundleError(f"{mpath}: index.args.{key} is {str(value)[:40]!r}, not a count "
                              f"of at least 1; {REEXPORT}")  # fmt: skip


def _check_verification(mpath: Path, cal: Any) -> None:
    """The calibrated thresholds, when the manifest has them, are numbers: a string or null
    would fail at the first verify, or mark every hit alike."""
    if cal is None:
        return
    rows = cal.get("thresholds") if isinstance(cal, dict) else None
    if not isinstance(rows, list):
        raise BundleError(f"{mpath}: verification.thresholds is not a list; {REEXPORT}")
    for n, row in enumerate(rows):
        for key in ("threshold", "far"):
            value = row.get(key) if isinstance(row, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise BundleError(f"{mpath}: verification.thresholds[{n}].{key} is "
                                  f"{str(value)[:40]!r}, not a number; {REEXPORT}")  # fmt: skip


def _check_shard_list(mpath: Path, manifest: dict[str, Any]) -> None:
    """A sharded bundle lists distinct, well-named shards, each with rows and a sha256.

    The names are checked before any is opened: a manifest must not make `load_bundle` read
    a file outside the bundle folder.
    """
    if manifest["format_version"] != SHARDED_FORMAT:
        return
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise BundleError(f"{mpath}: a format-{SHARDED_FORMAT} bundle lists its embedding "
                          f"shards under 'shards', this one does not; {REEXPORT}")  # fmt: skip
    for n, s in enumerate(shards):
        if not _is_shard_entry(s):
            raise BundleError(f"{mpath}: shards[{n}] needs a name, rows > 0 and a sha256; "
                              f"{REEXPORT}")  # fmt: skip
        if not SHARD_NAME.fullmatch(s["name"]):
            raise BundleError(f"{mpath}: shards[{n}] name {s['name']!r} is not a shard file name "
                              f"(embeddings-NNNNN.npy); {REEXPORT}")  # fmt: skip
    if len({s["name"] for s in shards}) != len(shards):
        raise BundleError(f"{mpath}: a shard is listed twice; {REEXPORT}")


def _is_shard_entry(s: Any) -> bool:
    return (
        isinstance(s, dict)
        and isinstance(s.get("name"), str)
        and isinstance(s.get("sha256"), str)
        and type(s.get("rows")) is int
        and s["rows"] > 0
    )


def load_bundle(path: str | os.PathLike, image_root: str | os.PathLike | None = None) -> Bundle:
    """Validate every file of the bundle at `path` against its manifest, then load it.

    Nothing is rebuilt or re-embedded. `image_root` overrides the manifest's (for a bundle
    moved to another machine); it only matters for reading thumbnails.
    """
    path = Path(path)
    manifest = read_manifest(path)
    root = Path(image_root) if image_root is not None else Path(manifest["image_root"])
    _check_image_root(root, "--image-root" if image_root is not None else f"{path / MANIFEST}",
                      must_exist=image_root is not None)  # before any file is hashed
    shards = manifest.get("shards") if manifest["format_version"] == SHARDED_FORMAT else None
    hashes = manifest["files"]
    digests = [(name, hashes.get(name)) for name in data_files(manifest)]
    digests += [(s["name"], s["sha256"]) for s in shards or []]
    if ONNX in hashes or "onnx" in manifest:  # optional, but checked like the rest when listed
        digests.append((ONNX, hashes.get(ONNX)))
    for name, expected in digests:
        _check_digest(path, name, expected)

    count, dim = manifest["count"], manifest["embedding_dim"]
    if shards:
        emb = _open_shards(path, shards, count, dim, manifest["dtype"])
    else:
        emb = _open_npy(path / EMBEDDINGS, count, dim, manifest["dtype"])
    metadata = _read_metadata(path / METADATA)
    if len(metadata) != count:
        raise BundleError(
            f"{path / METADATA} has {len(metadata)} rows but {MANIFEST} says {count}; {REEXPORT}"
        )
    classes = manifest["classes"]
    for n, row in enumerate(metadata, start=2):
        reason = _unsafe_reason(row["path"])
        if reason:
            raise BundleError(
                f"{path / METADATA} line {n}: path {row['path']!r} is unsafe ({reason}); "
                "metadata paths must stay under the image root"
            )
        if not 0 <= row["label"] < len(classes):
            raise BundleError(f"{path / METADATA} line {n}: label {row['label']} is out of range")
        if row["class"] != classes[row["label"]]:
            raise BundleError(
                f"{path / METADATA} line {n}: class {row['class']!r} is not class "
                f"{row['label']} of {MANIFEST} ({classes[row['label']]!r}); {REEXPORT}"
            )
    _check_images_dir(path)
    gallery = open_gallery(path, manifest, metadata)
    return Bundle(path, manifest, emb, metadata, gallery, root)


def data_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The files a bundle's manifest hashes in "files": embeddings (unless sharded),
    metadata, model and the gallery's own (index.faiss; none for a database)."""
    sharded = manifest["format_version"] == SHARDED_FORMAT
    base = (METADATA, MODEL) if sharded else (EMBEDDINGS, METADATA, MODEL)
    return (*base[:-1], *hashed_files(manifest), MODEL)


_SYSTEM_DIRS = ("/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib64", "/proc", "/root",
                "/run", "/sbin", "/sys", "/usr", "/var")  # fmt: skip


def _check_image_root(root: Path, where: str, must_exist: bool = False) -> None:
    """Refuse an image root that is a whole file system, a system folder or a home folder.

    Metadata paths only name images under the root, but with `image_root: /` a tampered
    bundle could still show any image of this machine on a contact sheet; a data folder is
    always something narrower. `must_exist`: the user named this root (`--image-root`), so
    a mistyped one is refused rather than leaving every thumbnail missing; the manifest's
    own may be absent (the bundle moved, and its images are not needed to search).
    """
    if must_exist and not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise ConfigError(f"{where} {root} {what}; pass the folder that holds the bundle's "
                          "class folders (where its images are now)")  # fmt: skip
    real = root.resolve()
    try:
        home = Path.home().resolve()
    except (RuntimeError, KeyError):  # no home folder known
        home = Path("/nonexistent-home")
    if real == real.parent or str(real) in _SYSTEM_DIRS or home.is_relative_to(real):
        raise BundleError(
            f"{where}: image root {root} is a file-system root, a system folder or a home "
            "folder, not a data folder; refusing to read images from it (pass --image-root "
            "with the folder the bundle was exported from)"
        )


def _check_images_dir(path: Path) -> None:
    """`images/` (copies of added images) must be a real folder inside the bundle: a symlink
    would make every `bundle:images/...` row, and `--add`'s copy of the folder, read outside."""
    images = path / IMAGES_DIR
    if images.is_symlink() or (images.exists() and not images.is_dir()):
        raise BundleError(
            f"{images} is a symlink or not a folder; a bundle keeps added images in a real "
            f"{IMAGES_DIR}/ folder inside it, refusing to read outside the bundle; {REEXPORT}"
        )


def _check_digest(path: Path, name: str, expected: str | None) -> None:
    bundle_file(path, name)
    if not expected:
        raise BundleError(f"{path / MANIFEST} records no sha256 for {name}; {REEXPORT}")
    if files.sha256_file(path / name) != expected:
        raise BundleError(
            f"{path / name} does not match its sha256 in {MANIFEST} (changed, truncated or "
            f"from another export); {REEXPORT}"
        )


def _open_npy(path: Path, rows: int, dim: int, dtype: str) -> np.memmap:
    """A read-only memory map of an embeddings file whose shape and dtype the manifest gives."""
    try:
        emb = np.load(path, allow_pickle=False, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise BundleError(f"{path} is not a readable .npy array ({e})") from None
    if emb.ndim != 2 or emb.shape != (rows, dim):
        raise BundleError(
            f"{path} has shape {emb.shape} but {MANIFEST} says ({rows}, {dim}); {REEXPORT}"
        )
    if emb.dtype != np.dtype(dtype):
        raise BundleError(f"{path} holds {emb.dtype} but {MANIFEST} says {dtype}")
    _check_finite_rows(path, emb)
    return emb


def _check_finite_rows(path: Path, emb: np.ndarray) -> None:
    """Every embedding is finite: a NaN row (its sha256 updated to match) would be loaded and
    verified, then score NaN against every query. Read once at load, `FINITE_CHUNK_ROWS`
    rows at a time, so a memory-mapped gallery is never read into memory whole (the sha256
    check has just read the same pages)."""
    for start in range(0, len(emb), FINITE_CHUNK_ROWS):
        chunk = np.asarray(emb[start : start + FINITE_CHUNK_ROWS])
        if not np.isfinite(chunk).all():
            row = start + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise BundleError(f"{path}: row {row} holds NaN or infinite values; the embeddings "
                              f"are corrupt: {REEXPORT}")  # fmt: skip


def _open_shards(
    path: Path, shards: list[dict[str, Any]], count: int, dim: int, dtype: str
) -> ShardReader:
    """Every shard checked against its manifest entry, then one reader over all of them."""
    total = sum(s["rows"] for s in shards)
    if total != count:
        raise BundleError(
            f"{path / MANIFEST}: its shards hold {total} rows but its count is {count}; "
            f"{REEXPORT}"
        )
    for s in shards:  # reads headers only; the reader maps a shard when it is used
        _open_npy(path / s["name"], s["rows"], dim, dtype)
    return ShardReader([path / s["name"] for s in shards])


def bundle_config(bundle: Bundle):
    """The exporting run's config; a bundle travels, so the machine keys are this machine's."""
    stored = for_this_machine(copy.deepcopy(bundle.manifest["config"]))
    return from_dict(stored, f"{bundle.path / MANIFEST}")


def safe_image_path(bundle: Bundle, rel: str) -> Path:
    """The file a metadata path names, refusing anything that leaves its root.

    Plain paths live under the image root; `bundle:` paths under the bundle folder's
    `images/`. `..`, absolute paths and symlinks that resolve outside (a symlinked
    `images/` included) are a BundleError: the bundle's own folder, resolved, is the bound
    for `bundle:` paths, never wherever `images/` points.
    """
    reason = _unsafe_reason(rel)
    if reason:
        raise BundleError(f"metadata path {rel!r} is unsafe ({reason}); refusing to read it")
    if rel.startswith(BUNDLE_PREFIX):
        path = files.inside(bundle.path, rel[len(BUNDLE_PREFIX) :], BundleError,
                            f"metadata path {rel!r}")  # fmt: skip
    else:
        path = files.inside(bundle.root, rel, BundleError, f"metadata path {rel!r}")
    # Only images are read: by name, or by content where the name does not say (a face set's
    # `subject01.glasses`), so a crafted row cannot make the service send any other file.
    if not is_image(path) and sniff_image(path) is None:
        raise BundleError(f"metadata path {rel!r} is not an image file; refusing to read it")
    return path

