"""Text for people: counts in words, names shortened for columns, untrusted names made
printable, and the one line a failure prints. A base module: data, retrieval, training and
the commands all write messages with it."""

from __future__ import annotations

import errno
import unicodedata

from mltrain.errors import MltrainError


def shortened(text: str, limit: int) -> str:
    """`text` cut to `limit` characters by an ellipsis in the middle, so that the end stays
    (`…/character02`, `….png`, what tells nested class names and files apart): for table
    columns and figure labels, never for what a program reads (JSON keeps names whole)."""
    if len(text) <= limit:
        return text
    head = (limit - 1) // 3
    return text[:head] + "…" + text[len(text) - (limit - 1 - head) :]


def counted(n: int, noun: str) -> str:
    """`1 image`, `2 images`, `2 classes`: messages count in words."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'sh', 'tch')) else 's'}"  # 2 epochs


def printable(text: object, keep_newlines: bool = False) -> str:
    """`text` with control and format characters (escape codes, bidi overrides, newlines)
    written as `\\x1b`-style escapes, so that names from untrusted files print as they are
    rather than steering the terminal. `keep_newlines` keeps line breaks of messages that
    list one item per line (they move the cursor, nothing more)."""
    out = []
    for ch in str(text):
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_ADVICE = {
    errno.ENOSPC: "the disk is full: free space or choose a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space or choose another folder",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.EACCES: "permission denied: fix the permissions or choose another folder",
    errno.EPERM: "not permitted: fix the permissions or choose another folder",
    errno.EISDIR: "it is a folder: give a file path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.ENOENT: "it does not exist: check the path",
    errno.ENAMETOOLONG: "a name in the path is too long for the file system: shorten it",
}


def os_error_message(e: OSError) -> str:
    """One line for a file-system failure: the file, what went wrong and what to do."""
    names = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    what = e.strerror or str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno, "check the path, the disk and the permissions")
    return f"{names + ': ' if names else ''}{what}; {advice}"


def error_line(e: BaseException) -> str:
    """The one line `run_main` prints for a failure caught at the command boundary."""
    if isinstance(e, MltrainError):
        text = str(e)
    elif isinstance(e, OSError):
        text = os_error_message(e)
    else:  # MemoryError
        text = ("out of memory; use a smaller batch (eval.batch_size, train.batch_size), a "
                "smaller model or a machine with more memory")  # fmt: skip
    lines = printable(text, keep_newlines=True).split("\n")
    return "error: " + "\n".join(shortened(line, MAX_LINE) for line in lines)


# Longest line of an error: a value pasted by mistake (a path of a million characters in an
# OSError, say) must not become a message of megabytes; the middle goes, the end stays.
MAX_LINE = 2000
