"""A CSV of `path,label` rows as a data root, the way product catalogues and many public data
sets ship their labels.

Paths are relative to the CSV file and must stay inside its folder (the CSV may come from
someone else). A header row is optional: when the first row names a path column (`path`,
`file`, `filename`, `image`) and a label column (`label`, `class`, `category`), those columns
are used and others ignored; without one, the first two columns are path and label.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from mltrain.data.labelled import (
    QUIET_EXCLUSIONS,
    ImageFolder,
    ReadOptions,
    exclusion_of,
    labelled_images,
    listing,
    natural_key,
)
from mltrain.errors import DataError
from mltrain.text import counted

PATH_COLUMNS = ("path", "file", "filename", "image")
LABEL_COLUMNS = ("label", "class", "category")
MISSING = "does not exist"  # the one row problem `data.bad_images: skip` passes over


def _columns(first: list[str]) -> tuple[int, int, bool]:
    """(path column, label column, whether `first` is a header)."""
    names = [c.strip().lower() for c in first]
    path = next((names.index(n) for n in PATH_COLUMNS if n in names), None)
    label = next((names.index(n) for n in LABEL_COLUMNS if n in names), None)
    if path is not None and label is not None:
        return path, label, True
    return 0, 1, False


def _rows(csv_path: Path) -> list[tuple[int, list[str]]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = enumerate(csv.reader(f), 1)
            return [(n, row) for n, row in rows if any(c.strip() for c in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read labels file {csv_path} ({e}); save it as UTF-8 CSV") from e


def read_labels_csv(
    csv_path: Path, exclude: Sequence[str], skip_missing: bool = False
) -> ImageFolder:
    """Labelled images listed in `csv_path`; every problem row is named by its line number.
    A file listed again with another label is a problem row (it would train as both
    classes); listed again with the same label, the repeat is left out with a note (as
    concatenated CSVs do). `skip_missing` (`data.bad_images: skip`) leaves out rows naming
    no file, with a note."""
    rows = _rows(csv_path)
    if not rows:
        raise DataError(f"labels file {csv_path} is empty; write one 'path,label' row per image")
    col_path, col_label, header = _columns(rows[0][1])
    if header and len(rows) == 1:  # else "0 classes ()" further on, as if rows were filtered
        raise DataError(f"labels file {csv_path} has a header row but no image rows; write one "
                        "'path,label' row per image below it")  # fmt: skip
    base = csv_path.parent
    by_class: dict[str, list[Path]] = {}
    labels: set[str] = set()
    problems, missing, repeated = [], [], []
    first: dict[Path, tuple[int, str]] = {}  # each file's first row: (line, label)
    for line, row in rows[int(header) :]:
        if len(row) <= max(col_path, col_label):
            problems.append(f"line {line}: expected path,label, got {row!r}")
            continue
        rel, label = row[col_path].strip(), row[col_label].strip()
        labels.add(label)
        problem = _problem(base, base.resolve(), rel, label)
        if problem:
            skip = skip_missing and problem.endswith(MISSING)
            (missing if skip else problems).append(f"line {line}: {problem}")
            continue
        was_line, was = first.setdefault((base / rel).resolve(), (line, label))
        if was_line != line and was != label:
            problems.append(f"line {line}: {rel} is listed again as {label!r} (line {was_line} "
                            f"says {was!r})")  # fmt: skip
        elif was_line != line:
            repeated.append(f"line {line} (as line {was_line})")
        elif not exclusion_of(label, exclude):
            by_class.setdefault(label, []).append(base / rel)
    if problems:
        skip = any(p.endswith(MISSING) for p in problems)
        hint = " (data.bad_images: skip leaves out rows naming no file)" if skip else ""
        raise DataError(
            f"{counted(len(problems), 'bad row')} in {csv_path}: {listing(problems, 3)}; "
            f"paths are relative to the CSV's folder; fix or delete those rows{hint}"
        )
    notes = _left_out(csv_path, missing, repeated)
    notes += [
        f"data.exclude_classes: no label '{e}' in {csv_path}; nothing excluded for it"
        for e in exclude
        if e not in QUIET_EXCLUSIONS and not any(exclusion_of(label, [e]) for label in labels)
    ]
    classes = sorted(by_class, key=natural_key)
    return labelled_images(base, {c: by_class[c] for c in classes}, notes)


def _left_out(csv_path: Path, missing: list[str], repeated: list[str]) -> list[str]:
    notes = []
    if missing:
        notes.append(f"data.bad_images: skip left out {counted(len(missing), 'row')} of "
                     f"{csv_path} naming no file: {listing(missing, 3)}")  # fmt: skip
    if repeated:
        notes.append(f"left out {counted(len(repeated), 'repeated row')} of {csv_path} (the "
                     f"same file and label as an earlier row): {listing(repeated, 3)}")  # fmt: skip
    return notes


def _problem(base: Path, real_base: Path, rel: str, label: str) -> str | None:
    if not rel or not label:
        return "empty path or label"
    path = base / rel
    if Path(rel).is_absolute():
        return f"{rel} is an absolute path; write it relative to {base}"
    if not path.resolve().is_relative_to(real_base):
        return f"{rel} lies outside {base}"
    if not path.is_file():
        return f"{rel} is not a file" if path.exists() else f"{rel} {MISSING}"
    return None


class LabelsCsvReader:
    """A `.csv` of `path,label` rows (any other name with the `csv:` prefix)."""

    kind: ClassVar[str] = "csv"
    what: ClassVar[str] = "a .csv of labels"

    def __init__(self, path: Path) -> None:
        self.path = path

    @staticmethod
    def claims(path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    def prepare(self) -> Path:
        return self.path

    def base(self) -> Path | None:
        return self.path.parent if self.path.is_file() else None

    def read(self, options: ReadOptions) -> ImageFolder:
        skip = options.bad_images == "skip"
        return read_labels_csv(self.path, options.exclude, skip_missing=skip)
