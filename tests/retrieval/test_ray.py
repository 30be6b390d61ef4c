"""`export --ray` and `add --ray`: a pool of Ray actors writes the bundle a single process
writes (same rows, order, metadata and layout), and every failure is one line that leaves an
existing bundle as it was. One local Ray serves the whole module: starting it is slow."""

from __future__ import annotations

import json
import shutil
import signal
import socket
from pathlib import Path

import numpy as np
import pytest

from mltrain.__main__ import main
from mltrain.retrieval.bundle import load_bundle
from tests.conftest import tiny_embedder, write_image_folder

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              # Ray Data's own context copy sets the fields it deprecates
              pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")]

# 18 images in batches of 4: five blocks shared by two actors, so order is really tested
SETS = ["eval.batch_size=4", "data.split=none"]


@pytest.fixture(scope="module")
def local_ray():
    """The module's local Ray, and the SIGTERM handlers from before and after it started."""
    pytest.importorskip("ray")
    from mltrain.inference.ray_embed import ray_runtime

    before = signal.getsignal(signal.SIGTERM)
    with ray_runtime() as ray:
        yield ray, before, signal.getsignal(signal.SIGTERM)


def test_starting_ray_keeps_the_handler_that_makes_kill_stop_like_ctrl_c(local_ray):
    """Ray's own handler would exit at once, without the commands' clean-up and line."""
    _, before, after = local_ray
    assert after is before


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of 3 classes x 6 images and a checkpoint of a random model over it."""
    from mltrain.config import to_dict
    from mltrain.files import atomic_save

    work = tmp_path_factory.mktemp("ray")
    root = write_image_folder(work / "data", 3, 6, (40, 32))
    embedder = tiny_embedder(root)
    atomic_save({"model": embedder.model.state_dict(), "config": to_dict(embedder.cfg),
                 "train_classes": []}, work / "model.pt")  # fmt: skip
    return work


def run(*argv: str, sets: list[str] = SETS) -> int:
    return main([*argv, *(x for s in sets for x in ("--set", s))])


def export(work: Path, out: Path, *extra: str, root: Path | None = None,
           sets: list[str] = SETS) -> int:  # fmt: skip
    return run("export", "--checkpoint", str(work / "model.pt"), "--out", str(out), *extra,
               sets=[f"data.root={root or work / 'data'}", *sets])  # fmt: skip


def rows(bundle: Path) -> np.ndarray:
    """Every stored embedding row, from embeddings.npy or the shards in manifest order."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    names = [s["name"] for s in manifest.get("shards", [])] or ["embeddings.npy"]
    return np.concatenate([np.load(bundle / n, allow_pickle=False) for n in names])


def assert_same_bundle(single: Path, ray: Path) -> None:
    a, b = rows(single), rows(ray)
    assert a.shape == b.shape
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, cos.min()
    assert (single / "metadata.csv").read_bytes() == (ray / "metadata.csv").read_bytes()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (single, ray))
    assert sorted(ma["files"]) == sorted(mb["files"])
    assert _lasting(ma) == _lasting(mb)
    assert load_bundle(ray).gallery.count() == len(b)


def _lasting(manifest: dict) -> dict:
    """A manifest without what differs between two writes of the same rows: times, hashes
    and thresholds (float sums in another order)."""
    out = {k: v for k, v in manifest.items() if k not in ("created", "files", "verification")}
    out["shards"] = [(s["name"], s["rows"]) for s in manifest.get("shards", [])]
    out["added"] = [a["count"] for a in manifest.get("added", [])]
    return out


@pytest.mark.parametrize("shard_size", [None, 7])
def test_export_and_add_on_ray_write_the_single_process_bundle(local_ray, work, tmp_path,
                                                               capsys, shard_size):  # fmt: skip
    sets = [*SETS, *([f"export.shard_size={shard_size}"] if shard_size else [])]
    assert export(work, tmp_path / "single", sets=sets) == 0
    assert export(work, tmp_path / "ray", "--ray", "--ray-actors", "2", sets=sets) == 0
    assert "exported 18 images" in capsys.readouterr().out
    assert_same_bundle(tmp_path / "single", tmp_path / "ray")
    if shard_size:
        assert len(json.loads((tmp_path / "ray" / "manifest.json").read_text())["shards"]) == 3
        return
    new = write_image_folder(tmp_path / "new", ["class_x", "class_y"], 3, (36, 36))
    assert main(["add", str(tmp_path / "single"), str(new)]) == 0
    assert main(["add", str(tmp_path / "ray"), str(new), "--ray"]) == 0
    assert_same_bundle(tmp_path / "single", tmp_path / "ray")


def test_an_unreadable_image_is_named_as_without_ray_and_the_old_bundle_stays(
    local_ray, work, tmp_path, capsys
):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    (data / "class_1" / "img_900.jpg").write_text("not an image")
    before = tmp_path / "b"
    assert export(work, before) == 0  # a good bundle already at --out
    old = {p.name: p.read_bytes() for p in before.iterdir()}
    capsys.readouterr()
    errors = []
    sets = ["data.check_images=false", "data.num_workers=0", *SETS]  # one line without Ray too
    for extra in ([], ["--ray"]):
        with pytest.raises(SystemExit) as e:
            export(work, before, *extra, root=data, sets=sets)
        assert e.value.code == 2
        errors.append(capsys.readouterr().err)
    assert errors[0] == errors[1] == (f"error: cannot read image {data / 'class_1' / 'img_900.jpg'}"
                                      " (not an image Pillow can identify); replace or delete "
                                      "the file\n")  # fmt: skip
    assert {p.name: p.read_bytes() for p in before.iterdir()} == old
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".b.")] == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flags, words", [
    (["--ray", "ray://127.0.0.1:PORT"], "--ray ray://127.0.0.1:PORT: cannot reach the Ray "
                                        "cluster (Connection refused); start it there"),
    (["--ray", "nowhere"], "--ray nowhere: not a Ray address; give auto"),
    (["--ray-actors", "2"], "--ray-actors sizes the Ray pool; add --ray to embed with Ray"),
    (["--ray", "--ray-actors", "64"], "a pool of 64 Ray actors x 1 CPU does not fit this "
                                      "machine's Ray"),
    (["--ray", "--ray-gpus", "1"], "a pool of 1 Ray actor x 1 GPU does not fit this machine's "
                                   "Ray (2 CPUs, 0 GPUs); give fewer"),
    (["--ray", "--ray-gpus", "-1"], "--ray-gpus -1: give GPUs per actor, from 0 to 64"),
])  # fmt: skip
def test_ray_mistakes_are_one_line_before_anything_is_written(local_ray, work, tmp_path,
                                                              capsys, flags, words):  # fmt: skip
    ray, _, _ = local_ray
    cpus, gpus = (int(ray.cluster_resources().get(k, 0)) for k in ("CPU", "GPU"))
    if "--ray-gpus" in flags and gpus:
        pytest.skip("this machine's Ray has a GPU")
    words = words.replace("2 CPUs", f"{cpus} CPUs")
    port = str(_closed_port())
    flags = [f.replace("PORT", port) for f in flags]
    with pytest.raises(SystemExit) as e:
        export(work, tmp_path / "b", *flags)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert words.replace("PORT", port) in err
    assert not (tmp_path / "b").exists()


def test_without_ray_installed_the_extra_is_named(work, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(SystemExit):
        export(work, tmp_path / "b", "--ray")
    assert capsys.readouterr().err == (
        "error: --ray needs Ray, which is not installed (ray); install it with "
        "pip install -e '.[ray]'\n"
    )


def test_an_actor_that_dies_is_one_line_naming_its_error(local_ray, work, capfd):
    """Weights that do not fit the model kill each actor as it starts; the failure is our
    line, with the actor's own error, and none of Ray's tracebacks."""
    from mltrain.errors import MltrainError
    from mltrain.inference.ray_embed import RayOptions, ray_embedder

    ray, _, _ = local_ray
    embedder = tiny_embedder(work / "data")
    with ray_embedder(embedder, RayOptions(actors=1)) as pool:
        pool.weights = ray.put({})
        with pytest.raises(MltrainError) as e:
            pool.embed(sorted((work / "data").rglob("img_*"))[:4])
    assert str(e.value).startswith("a Ray embedding actor failed (mltrain.errors.CheckpointError:"
                                   " the model sent to Ray: the weights do not fit")
    assert "\n" not in str(e.value) and "Traceback" not in capfd.readouterr().err


def test_the_actors_embed_with_the_runner_the_config_names(local_ray, work, tmp_path):
    """`eval.backend` reaches the actors: OpenVINO there too, so the rows match OpenVINO's
    (torch's differ by bf16 rounding, about 2e-3, on a CPU that OpenVINO runs in bf16)."""
    pytest.importorskip("openvino")
    sets = [*SETS, "eval.backend=openvino"]
    assert export(work, tmp_path / "single", sets=sets) == 0
    assert export(work, tmp_path / "ray", "--ray", "--ray-actors", "1", sets=sets) == 0
    assert_same_bundle(tmp_path / "single", tmp_path / "ray")
    np.testing.assert_allclose(rows(tmp_path / "ray"), rows(tmp_path / "single"), atol=1e-5)


def test_a_local_pool_shares_the_machine_s_cpus_among_its_actors(local_ray, work):
    from mltrain.inference.ray_embed import RayOptions, ray_embedder

    ray, _, _ = local_ray
    cpus = int(ray.cluster_resources()["CPU"])
    embedder = tiny_embedder(work / "data")
    shapes = {}
    for options in (RayOptions(actors=1), RayOptions(), RayOptions(threads=1)):
        with ray_embedder(embedder, options) as pool:
            shapes[options] = pool.shape(40), pool.shape(5), pool.shape(1)
    assert shapes[RayOptions(actors=1)] == ((1, cpus),) * 3  # one actor: every CPU
    assert shapes[RayOptions()] == ((1, cpus),) * 3  # unasked on a local Ray: one actor too
    assert shapes[RayOptions(threads=1)] == ((cpus, 1), (min(cpus, 2), 1), (1, 1))


def test_the_pool_takes_the_actors_started_with_ray_or_stops_them(local_ray, work):
    """`ray_started_early` starts the pool's actors with Ray, so they import torch while the
    command builds its model: a pool of their shape embeds on them; one of another shape
    stops them and starts its own."""
    from mltrain.inference import ray_start
    from mltrain.inference.ray_embed import RayOptions, ray_embedder

    ray, _, _ = local_ray
    embedder = tiny_embedder(work / "data")
    embedder.cfg.eval.batch_size = 2  # three blocks: work for both actors
    paths = sorted((work / "data").rglob("img_*"))[:6]
    for options, reused in ((RayOptions(actors=2), True), (RayOptions(threads=1), False)):
        ray_start._start_early(ray, RayOptions(actors=2))
        early = list(ray_start._early.actors)
        assert len(early) == 2
        with ray_embedder(embedder, options) as pool:
            assert pool.embed(paths).shape == (6, embedder.model.embedding_dim)
            assert (pool.actors == early) is reused and ray_start._early is None
        assert all(_stops(ray, actor) for actor in early)  # with the pool, or at its start


def _stops(ray, actor, tries: int = 100) -> bool:
    """Whether a killed actor is gone within seconds (a kill reaches it through Ray's control
    plane; a call sent straight after may still run)."""
    import time

    for _ in range(tries):
        try:
            ray.get(actor.warm.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            return True
        time.sleep(0.1)
    return False


def _run_alone(argv: list[str]) -> tuple[int, str, str, list[str]]:
    """(exit code, stdout, stderr, processes of its Ray session still running) of a command
    in a process of its own (Ray names a session after its driver's pid)."""
    import os
    import subprocess

    proc = subprocess.Popen(argv, env={**os.environ, "TQDM_DISABLE": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    out, err = proc.communicate(timeout=300)
    left = subprocess.run(["pgrep", "-f", f"session_[0-9_-]+_{proc.pid}([^0-9]|$)"],
                          capture_output=True, text=True).stdout.split()  # fmt: skip
    return proc.returncode, out, err, left


def test_a_ray_export_in_its_own_process_starts_ray_early_and_leaves_nothing(work, tmp_path):
    """The command starts its local Ray while torch is imported (`ray_started_early`), and
    shuts it down at the end, also after an error that comes before any embedding."""
    import sys

    pytest.importorskip("ray")
    argv = [sys.executable, "-m", "mltrain", "export", "--checkpoint", str(work / "model.pt"),
            *(x for s in [f"data.root={work / 'data'}", *SETS] for x in ("--set", s))]  # fmt: skip
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    code, _, err, left = _run_alone([*argv, "--out", str(tmp_path / "taken"), "--ray"])
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "is not a search bundle" in err and left == []
    code, out, err, left = _run_alone([*argv, "--out", str(tmp_path / "ray"), "--ray"])
    assert code == 0 and "exported 18 images" in out and left == [], err[-2000:]
    assert "Traceback" not in err
    assert export(work, tmp_path / "single") == 0
    assert_same_bundle(tmp_path / "single", tmp_path / "ray")


def test_an_actor_s_threads_share_a_batch_by_whole_chunks(work):
    """Torch on the CPU: each thread runs the model single-threaded on whole chunks of the
    batch, so the rows are those of one call over the batch."""
    import copy

    import torch

    from mltrain.inference.batching import embed_tensor
    from mltrain.inference.ray_embed import _EmbedActor

    pytest.importorskip("ray")
    embedder = tiny_embedder(work / "data")
    cfg = copy.deepcopy(embedder.cfg)
    cfg.eval.cpu_chunk = 2
    actor = _EmbedActor(cfg, 0, embedder.model.state_dict(), threads=3, device="cpu",
                        runner="torch")  # fmt: skip
    assert actor.shares == 3 and torch.get_num_threads() == 1
    x = torch.randn(11, 3, 32, 32)  # shares of 4, 4 and 3 rows: chunks as in one call
    np.testing.assert_array_equal(actor._embed(x), embed_tensor(actor.model, x, actor.spec))
