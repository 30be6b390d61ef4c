"""Crash-safe writes and file-system safety, shared by training, bundles, evaluation folders
and search: containment, regular files, a crash-safe directory swap, a per-target lock, atomic
`torch.save`, and disk checks that fail before long work rather than during it.

Bundles come from other people, so a path inside one is untrusted: `inside` resolves both the
trusted folder and the joined path, so neither a `..` nor a symlink (the folder `images/`
itself included) reads outside it. Folders that took minutes to write are replaced with
`replace_dir`, which never leaves the target path empty: an atomic exchange where the system
has one (Linux `renameat2`), else two renames whose leftover `recover_dir` puts back.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from mltrain.errors import MltrainError

try:
    import fcntl
except ImportError:  # not POSIX: writers are not serialised
    fcntl = None

STAGING_TAGS = ("partial", "adding", "old")  # hidden siblings `.NAME.<tag>-XXXX` of a target
_local = threading.local()  # .held: targets whose lock this thread holds (re-entrant)


def inside(anchor: Path, rel: str, error: type[Exception], what: str) -> Path:
    """`anchor/rel` resolved, or `error` when it resolves outside `anchor` (resolved too).
    `what` names the path in the message (e.g. "metadata path 'bundle:images/a.jpg'").

    `rel` must already be relative without `..` (callers check that lexically); this catches
    symlinks anywhere along it, including a symlinked first component such as `images`.
    """
    base = anchor.resolve()
    target = (base / rel).resolve()
    if not target.is_relative_to(base):
        raise error(
            f"{what} resolves to {target}, outside {base} (a symlink?); refusing to read it"
        )
    return target


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def json_depth(text: str) -> int:
    """How deeply `text`'s arrays and objects nest, counted without parsing (brackets inside
    strings do not count): Python's parser recurses, so depth is checked before it runs."""
    bare = _JSON_STRING.sub("", text).encode("utf-8", "replace")
    b = np.frombuffer(bare, np.uint8)
    opens = (b == ord("[")) | (b == ord("{"))
    closes = (b == ord("]")) | (b == ord("}"))
    steps = opens.astype(np.int64) - closes
    return int(np.cumsum(steps).max(initial=0))


def read_json(path: Path, error: type[Exception], max_bytes: int, max_depth: int,
              what_to_do: str) -> Any:  # fmt: skip
    """The JSON in file `path`, or one `error` line naming it: larger than `max_bytes`, not
    UTF-8, nested deeper than `max_depth` or not JSON. Files from elsewhere (a bundle's
    manifest) must not reach the parser with a size or a depth that exhausts memory or
    the stack. NaN and Infinity parse as floats; callers that need finite numbers check."""
    size = os.stat(path).st_size
    if size > max_bytes:
        raise error(f"{path} holds {size:,} bytes, more than the {max_bytes:,} it may; "
                    f"{what_to_do}")  # fmt: skip
    with open(path, "rb") as f:
        raw = f.read(max_bytes + 1)
    if len(raw) > max_bytes:  # it grew since the stat
        raise error(f"{path} holds more than {max_bytes:,} bytes; {what_to_do}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path} is not valid JSON (not UTF-8 text at byte {e.start:,}); "
                    f"{what_to_do}") from None  # fmt: skip
    depth = json_depth(text)
    if depth > max_depth:
        raise error(f"{path} nests {depth:,} levels deep, more than the {max_depth} allowed "
                    f"(no valid file comes close); {what_to_do}")  # fmt: skip
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise error(f"{path} is not valid JSON ({e}); {what_to_do}") from None


def nonfinite_key(data: Any, key: str = "", skip: tuple[str, ...] = ()) -> str | None:
    """The dotted key of the first NaN or infinite number in parsed JSON `data` (Python's
    parser takes `NaN`, `Infinity` and `1e400`), or None; keys in `skip` are not looked
    into. Keys of lists read `thresholds[2]`."""
    if isinstance(data, float):
        return None if math.isfinite(data) else key
    items: Any = ()
    if isinstance(data, dict):
        items = ((f"{key}.{k}" if key else str(k), v) for k, v in data.items())
    elif isinstance(data, list):
        items = ((f"{key}[{i}]", v) for i, v in enumerate(data))
    for sub, value in items:
        if sub in skip:
            continue
        found = nonfinite_key(value, sub, skip)
        if found is not None:
            return found
    return None


def is_regular(path: Path) -> bool:
    """A regular file (symlinks followed): not a folder, FIFO, socket or device, which could
    hang a reader (FIFO, /dev/zero) or be no data at all."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def remove(path: Path) -> None:
    """Delete a file, link or folder tree; missing is fine, errors are ignored (best effort)."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def umask() -> int:
    """The process umask, read without changing it (os.umask can only set it, and setting it
    for a moment races other threads creating files); 0o022 where /proc is not there."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next((x for x in f if x.startswith("Umask:")), "")
        return int(line.split()[1], 8) if line else 0o022
    except (OSError, ValueError, IndexError):
        return 0o022


def staging_dir(target: Path, tag: str) -> Path:
    """A new hidden folder beside `target` (same file system, so it can be renamed into place),
    with the mode a plain mkdir would give it (mkdtemp makes it private, 0700)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}-", dir=target.parent))
    path.chmod(0o777 & ~umask())
    return path


def siblings(target: Path, tag: str) -> list[Path]:
    """Staging folders `.NAME.<tag>-*` beside `target` (left by a killed writer when no
    writer holds the target's lock)."""
    prefix = f".{target.name}.{tag}-"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` before it is renamed into place."""
    for d, _, names in os.walk(folder):
        for name in names:
            p = Path(d) / name
            if p.is_symlink() or not p.is_file():
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(d))


def reserve(path: Path) -> None:
    """Allocate the blocks of a file about to be filled through a memory map, so a full disk
    is an OSError now rather than a SIGBUS (a crash) at the first page the disk cannot hold.
    File systems without fallocate keep the old behaviour."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS):
            raise OSError(e.errno, e.strerror, str(path)) from None
    finally:
        os.close(fd)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where the system
    or file system cannot, so the caller falls back to two renames."""
    if sys.platform != "linux":
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


# Indirections so tests can inject a crash at each step of the swap.
exchange = _renameat2_exchange
rename = os.replace


def replace_dir(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`, replacing what is there.

    The target path always names a complete folder: with an atomic exchange it is the old
    folder until the one instant it is the new one, and the old one (now at `new`'s name) is
    then deleted. Without one, the old folder is renamed aside to `.NAME.old-*` first; a kill
    before the second rename leaves the path empty and `recover_dir` renames it back.
    Callers hold `lock(target)`, so no other writer is half way through the same swap.
    """
    fsync_tree(new)
    if not (target.exists() or target.is_symlink()):
        rename(new, target)
    elif exchange(new, target):
        fsync_dir(target.parent)
        remove(new)  # the old folder, now under the staging name
    else:
        old = staging_dir(target, "old")
        old.rmdir()
        rename(target, old)
        rename(new, target)
        fsync_dir(target.parent)
        remove(old)
    fsync_dir(target.parent)


def recover_dir(target: Path, complete: Callable[[Path], bool]) -> Path | None:
    """After a kill between the two renames of `replace_dir`: put the old folder back.

    Only when `target` is missing and a `.NAME.old-*` sibling is `complete`; the newest such
    one returns to `target` (the interrupted write is lost, the previous state is whole).
    Returns the folder it restored, or None.
    """
    if target.exists() or target.is_symlink() or not siblings(target, "old"):
        return None
    with lock(target):  # a live writer mid-swap finishes first
        olds = [p for p in siblings(target, "old") if p.is_dir() and complete(p)]
        if target.exists() or target.is_symlink() or not olds:
            return None
        newest = max(olds, key=lambda p: p.stat().st_ctime)
        rename(newest, target)
        fsync_dir(target.parent)
        return newest


def clean_stale(target: Path) -> None:
    """Delete staging folders that killed writers left beside `target` (call under its lock:
    no live writer then owns one)."""
    for tag in STAGING_TAGS:
        for p in siblings(target, tag):
            remove(p)


@contextlib.contextmanager
def lock(target: Path) -> Iterator[None]:
    """An exclusive lock on `target` across processes (`.NAME.lock` beside it, flock).

    Writers of a folder hold it from before they read the old state until the swap is done,
    so concurrent writers queue instead of losing each other's changes, and staging folders
    seen under the lock are stale. Re-entrant within a thread. The lock file is removed on
    release; a waiter that then holds the lock of a removed file tries again.
    """
    key = target.absolute()
    held: set[Path] = _local.__dict__.setdefault("held", set())
    if key in held or fcntl is None:
        yield
        return
    path = target.parent / f".{target.name}.lock"
    target.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not waited:
                print(f"waiting for another process writing {target} (lock {path})",
                      file=sys.stderr)  # fmt: skip
                waited = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed that lock file: lock the current one
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


@contextlib.contextmanager
def staging(
    target: Path, tag: str, recover: Callable[[Path], object] | None = None
) -> Iterator[Path]:
    """A new staging folder beside `target`, under `target`'s lock: every long write (search
    bundles, evaluation folders) is made crash-safe this one way. Staging folders that killed
    writers left are deleted first, after `recover` has put back anything a killed swap set
    aside; the body moves the finished folder into place (`replace_dir`), and the folder is
    removed if the body raises."""
    with lock(target):
        if recover is not None:
            recover(target)
        clean_stale(target)
        tmp = staging_dir(target, tag)
        try:
            yield tmp
        except BaseException:
            remove(tmp)
            raise


def check_writable(folder: Path, what_to_do: str) -> None:
    """Write, fsync and delete a small probe file in `folder`: a read-only folder, a full disk
    or a permission problem shows up now rather than at the first checkpoint."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(b"0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as e:
        raise MltrainError(f"cannot write to {folder} ({e.strerror or e}); {what_to_do}") from None


def _existing(path: Path) -> Path:
    """`path` or its nearest existing parent (the cache folder may not exist yet)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def size_text(n: int) -> str:
    """`1.5 GiB`, `20.0 MiB`, `512 bytes`: sizes as messages quote them."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:,} byte{'' if n == 1 else 's'}"


def _size(n: int) -> str:
    """The size with its exact byte count, for the disk-space error."""
    return size_text(n) if n < 2**10 else f"{size_text(n)} ({n:,} bytes)"


def check_free_space(needs: list[tuple[Path, str, int]], what_to_do: str | None = None) -> None:
    """`needs` lists (folder, what goes there, bytes); folders on one filesystem add up.
    Raises `MltrainError` naming the folder, the bytes needed and free, and what to do
    (`what_to_do`, or for a training run where to point its outputs instead)."""
    by_device: dict[int, list[tuple[Path, str, int]]] = {}
    for folder, what, n in needs:
        by_device.setdefault(_existing(folder).stat().st_dev, []).append((folder, what, n))
    for entries in by_device.values():
        need = sum(n for _, _, n in entries)
        free = shutil.disk_usage(_existing(entries[0][0])).free
        if free < need:
            parts = ", ".join(f"{what} in {folder}: {_size(n)}" for folder, what, n in entries)
            raise MltrainError(
                f"not enough disk space: this run needs about {_size(need)} ({parts}) but "
                f"only {_size(free)} is free on the disk holding {entries[0][0]}; "
                + (what_to_do or "free some space, or set output_dir (checkpoints) or the "
                   "MLTRAIN_CACHE environment variable (prefix cache) to a folder on a larger "
                   "disk")
            )


def check_output_folders(needs: list[tuple[Path, str, int]], what_to_do: str) -> None:
    """Before long work whose results go to folders that may not exist yet: the first
    existing folder on each path is writable (probe file) and the disks have the bytes."""
    for folder, what, _ in needs:
        check_writable(_existing(folder.parent), f"{what}: {what_to_do}")
    check_free_space([(_existing(folder), what, n) for folder, what, n in needs], what_to_do)


class _WriteRecorder:
    """A file wrapper that keeps the OSError of a failed write: torch's zip writer reports
    it as an opaque RuntimeError ("unexpected pos ..."), which would hide a full disk."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def torch_save(obj: Any, f: BinaryIO, name: str | Path) -> None:
    """`torch.save` into an open file; a failed write (full disk, read-only file system)
    is an OSError naming `name`, as for any other file."""
    recorder = _WriteRecorder(f)
    try:
        torch.save(obj, recorder)
    except RuntimeError:
        if recorder.error is None:
            raise
        e = recorder.error
        raise OSError(e.errno, e.strerror, str(name)) from None


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """The file's SHA-256, read in chunks: a bundle's files are checked against these."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_save(obj: Any, path: str | Path) -> None:
    """`torch.save` through `atomic_write`: checkpoints and the prefix cache are never torn."""
    atomic_write(path, lambda f: torch_save(obj, f, path))


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write` into a temporary file in the same folder, fsync, then rename over `path`.

    A kill, a full disk or Ctrl-C at any moment leaves either the old file or the new one,
    never a torn file; the temporary file is removed when `write` fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())  # as open() would, not mkstemp's 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
