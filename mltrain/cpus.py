"""The CPUs this process may use, in a module free of torch: Ray's start
(`mltrain.inference.ray_start`) sizes a local Ray with it before torch is imported, and
`mltrain.runtime` re-exports it for everything else."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs in this process's affinity mask (a container's or `taskset`'s limit), else all."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
