"""Download public data sets into a folder layout `scan_folder` reads
(`python -m mltrain download caltech101 DEST`)."""

from __future__ import annotations

import os
from pathlib import Path

from mltrain.errors import DataError


def download_caltech101(dest: str | os.PathLike) -> Path:
    """Fetch Caltech101 with torchvision (needs network and `gdown`); return the class-folder root.

    torchvision stores it as DEST/caltech101/101_ObjectCategories; it skips the download when
    that folder already exists. `BACKGROUND_Google` is clutter, not a class: exclude it.
    """
    from torchvision.datasets import Caltech101  # slow import, only needed here

    try:
        Caltech101(str(dest), download=True)
    except Exception as e:  # network, gdown missing, quota: all mean "download it yourself"
        raise DataError(
            f"downloading Caltech101 to {dest} failed ({type(e).__name__}: {e}); download "
            "101_ObjectCategories.tar.gz by hand and point data.root at it"
        ) from e
    return Path(dest) / "caltech101" / "101_ObjectCategories"


DATASETS = {"caltech101": download_caltech101}
