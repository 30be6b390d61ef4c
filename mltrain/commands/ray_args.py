"""`--ray [ADDRESS]` and the pool flags of the commands that embed many images (export, add):
the images go through a pool of Ray actors (`mltrain.inference.ray_embed`), the bundle is
written here as without Ray. Ray's presence and the address are checked as the flags are
read, before any model is built."""

from __future__ import annotations

import argparse

from mltrain.errors import ConfigError

LOCAL = "local"  # what a bare --ray stands for: a new Ray on this machine


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Ray", "embed on a pool of Ray actors (pip install -e '.[ray]')")
    g.add_argument("--ray", nargs="?", const=LOCAL, metavar="ADDRESS",
                   help="embed with Ray: bare, a local Ray on this machine; auto, host:6379 or "
                        "ray://host:10001, a running cluster (images at the same paths on "
                        "every node). Put a bare --ray after the positional arguments")
    g.add_argument("--ray-actors", type=int, metavar="N",
                   help="actors in the pool (default on a local Ray: one, one per GPU, or "
                        "its CPUs / --ray-threads; on a cluster: its CPUs / --ray-threads, "
                        "or GPUs / --ray-gpus)")
    g.add_argument("--ray-threads", type=int, metavar="N",
                   help="CPU threads per actor (default: a local Ray's CPUs / the actors, 1 on "
                        "a cluster; 4 decoders for an actor on a GPU)")
    g.add_argument("--ray-gpus", type=float, metavar="G",
                   help="GPUs per actor, e.g. 1 or 0.5 (default 1 when the model runs on CUDA, "
                        "else 0)")  # fmt: skip


def ray_options(args: argparse.Namespace):
    """The parsed flags as `RayOptions`, or None without --ray; Ray installed and the address
    reachable, else one line saying what to do."""
    pool = {"--ray-actors": args.ray_actors, "--ray-threads": args.ray_threads,
            "--ray-gpus": args.ray_gpus}  # fmt: skip
    if args.ray is None:
        given = [flag for flag, value in pool.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} sizes the Ray pool; add --ray to embed with Ray")
        return None
    from mltrain.inference.ray_start import RayOptions, check_reachable, require_ray

    require_ray()
    address = None if args.ray == LOCAL else args.ray
    if address is not None:
        check_reachable(address)
    return RayOptions(address, args.ray_actors, args.ray_threads, args.ray_gpus)
