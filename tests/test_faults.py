"""Faults: a kill at each step of the bundle swap, full and read-only disks, and Ctrl-C.

A kill is simulated in-process by raising `Killed` (a BaseException nothing catches) at the
chosen step with the clean-up helpers disabled, which leaves the disk exactly as a SIGKILL
there would; one test kills a real process. Full and read-only disks are small tmpfs mounts
(needs root and a kernel that allows it; skipped otherwise).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

import mltrain.evaluation.evaluate as evaluation_mod
import mltrain.retrieval.add as add_mod
import mltrain.retrieval.gallery as gallery_mod
from mltrain import files as safefs
from mltrain.commands.common import run_main
from mltrain.commands.search import script as search_main
from mltrain.inference.embedder import Embedder
from mltrain.retrieval.add import add_images
from mltrain.retrieval.bundle import load_bundle
from mltrain.retrieval.export import export_bundle
from tests.conftest import TINY_EMBED, tiny_embedder, write_image_folder

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it and (with `safefs.remove` disabled) nothing
    is cleaned up on the way out."""


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("faults")
    root = write_image_folder(base / "data", classes=3, per_class=4, size=(32, 32))
    return root, export_bundle(tiny_embedder(root), base / "b", "fault tests")


@pytest.fixture
def bundle(exported, tmp_path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(exported[1], copy)
    return copy


def new_images(folder: Path, name: str, n: int = 1, seed: int = 0) -> Path:
    write_image_folder(folder, classes=[name], per_class=n)
    for i, p in enumerate(sorted((folder / name).iterdir())):  # distinct from the bundle's
        Image.effect_noise((32, 32), 60 + 10 * seed + i).convert("RGB").save(p.with_suffix(".png"))
        p.unlink()
    return folder / name


def fingerprint(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def leftovers(b: Path) -> list[str]:
    return sorted(p.name for p in b.parent.iterdir() if p.name.startswith(f".{b.name}."))


def one_error_line(err: str) -> str:
    lines = [x.split("\r")[-1].strip() for x in err.splitlines()]
    lines = [x for x in lines if x and "it/s]" not in x and "s/it]" not in x]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "interrupted")), err
    assert "Traceback" not in err
    return lines[0]


# --- a kill at each step of the swap ---------------------------------------------------------

STEPS = {  # step -> bundle rows after the kill: 0 = the old bundle, 1 = the new one
    "exchange: before": 0,
    "exchange: after": 1,
    "two renames: before the first": 0,
    "two renames: between them": 0,  # the path is empty; load_bundle puts the old one back
    "two renames: after the second": 1,
}


def inject(monkeypatch, step: str) -> None:
    """Make the swap die at `step`, leaving what a SIGKILL there leaves."""
    real_exchange, real_rename = safefs.exchange, safefs.rename
    renames = []
    monkeypatch.setattr(safefs, "remove", lambda path: None)  # no clean-up after a kill
    if step.startswith("exchange"):
        def exchange(a, b):
            if step.endswith("before"):
                raise Killed
            assert real_exchange(a, b), "this file system has no atomic exchange"
            raise Killed

        monkeypatch.setattr(safefs, "exchange", exchange)
        return
    monkeypatch.setattr(safefs, "exchange", lambda a, b: False)

    def rename(src, dst):
        renames.append(src)
        if step.endswith("before the first") or (step.endswith("between them")
                                                  and len(renames) == 2):  # fmt: skip
            raise Killed
        real_rename(src, dst)
        if step.endswith("after the second") and len(renames) == 2:
            raise Killed

    monkeypatch.setattr(safefs, "rename", rename)


@pytest.mark.parametrize("step", list(STEPS))
def test_kill_at_each_step_of_the_add_swap_never_loses_the_bundle(bundle, tmp_path, step,
                                                                  monkeypatch, capsys):  # fmt: skip
    n0 = len(load_bundle(bundle))
    old = fingerprint(bundle)
    with monkeypatch.context() as m:
        inject(m, step)
        with pytest.raises(Killed):
            add_images(bundle, new_images(tmp_path / "new", "zebra"))
    assert leftovers(bundle)  # the kill left staging folders behind
    b = load_bundle(bundle)  # never "not a folder"
    assert len(b) == n0 + STEPS[step] and b.index.ntotal == len(b)
    if STEPS[step] == 0:
        assert fingerprint(bundle) == old
    if step.endswith("between them"):
        assert "restored the previous bundle" in capsys.readouterr().err
    assert add_images(bundle, new_images(tmp_path / "more", "yak", seed=1)) == 1
    assert len(load_bundle(bundle)) == n0 + STEPS[step] + 1
    assert leftovers(bundle) == []  # the next writer deleted the stale staging folders


def test_kill_between_the_renames_of_an_export_keeps_the_older_bundle(exported, bundle,
                                                                      monkeypatch):  # fmt: skip
    old = fingerprint(bundle)
    embedder = tiny_embedder(exported[0])
    with monkeypatch.context() as m:
        inject(m, "two renames: between them")
        with pytest.raises(Killed):
            export_bundle(embedder, bundle, "second export", index="hnsw")
    assert not bundle.exists()
    assert load_bundle(bundle).manifest["source"] == "fault tests"
    assert fingerprint(bundle) == old


def test_a_really_killed_add_is_recovered_on_the_next_load(bundle, tmp_path):
    """SIGKILL (os._exit) of a real process between the two renames."""
    n0 = len(load_bundle(bundle))
    new = new_images(tmp_path / "new", "zebra")
    script = f"""
import os
from mltrain import files as safefs
from mltrain.retrieval.add import add_images
real, calls = safefs.rename, []
def rename(src, dst):
    calls.append(src)
    if len(calls) == 2:
        os._exit(137)
    real(src, dst)
safefs.exchange = lambda a, b: False
safefs.rename = rename
add_images({str(bundle)!r}, {str(new)!r})
"""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 137, done.stderr
    assert not bundle.exists() and len(leftovers(bundle)) >= 2  # .b.old-* and .b.adding-*
    assert len(load_bundle(bundle)) == n0
    assert add_images(bundle, new) == 1 and leftovers(bundle) == []


def test_stale_staging_folders_of_killed_writers_are_deleted(bundle, tmp_path):
    for name in (".b.adding-k1ll3d", ".b.partial-x", ".b.old-y"):
        (bundle.parent / name).mkdir()
        (bundle.parent / name / "embeddings.npy").write_bytes(b"\0" * 4096)
    assert add_images(bundle, new_images(tmp_path / "new", "zebra")) == 1
    assert leftovers(bundle) == []


def test_concurrent_adds_queue_instead_of_losing_images(bundle, tmp_path):
    n0 = len(load_bundle(bundle))
    sets = [new_images(tmp_path / f"new{i}", f"class{i}", seed=i) for i in range(2)]
    errors: list[BaseException] = []

    def add(folder):
        try:
            add_images(bundle, folder)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [threading.Thread(target=add, args=(s,)) for s in sets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    b = load_bundle(bundle)
    assert len(b) == n0 + 2 and {"class0", "class1"} <= set(b.classes)
    assert leftovers(bundle) == []


# --- full and read-only disks (tmpfs) -------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 700 KiB tmpfs: room for one tiny bundle (about 460 KiB), not for a second copy."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)


def fill(mount: Path, leave: int) -> None:
    """Fill the disk until about `leave` bytes are free."""
    free = shutil.disk_usage(mount).free
    with open(mount / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_add_to_a_full_disk_fails_before_embedding(exported, small_disk, tmp_path, capsys,
                                                   monkeypatch):  # fmt: skip
    b = small_disk / "b"
    shutil.copytree(exported[1], b)
    before = fingerprint(b)
    monkeypatch.setattr(Embedder, "embed", lambda *a, **k: pytest.fail("embedded"))
    assert search_main(["--add", str(b), str(new_images(tmp_path / "n", "zebra"))]) == 2
    assert "not enough disk space" in one_error_line(capsys.readouterr().err)
    assert fingerprint(b) == before and leftovers(b) == []


def test_disk_full_while_adding_leaves_the_bundle_and_no_staging(exported, small_disk, tmp_path,
                                                                capsys, monkeypatch):  # fmt: skip
    b = small_disk / "b"
    shutil.copytree(exported[1], b)
    before = fingerprint(b)
    monkeypatch.setattr(add_mod, "check_free_space", lambda *a, **k: None)  # reach the write
    assert search_main(["--add", str(b), str(new_images(tmp_path / "n", "zebra"))]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "No space left on device" in line and "free space" in line
    assert fingerprint(b) == before and leftovers(b) == []


def test_add_on_a_read_only_disk_is_one_line(exported, small_disk, tmp_path, capsys):
    b = small_disk / "b"
    shutil.copytree(exported[1], b)
    before = fingerprint(b)
    read_only(small_disk)
    assert search_main(["--add", str(b), str(new_images(tmp_path / "n", "zebra"))]) == 2
    assert "Read-only file system" in one_error_line(capsys.readouterr().err)
    assert fingerprint(b) == before


@pytest.mark.parametrize("disk", ["full", "read-only"])
def test_sheet_on_a_full_or_read_only_disk_is_one_line_and_no_file(exported, small_disk, disk,
                                                                  capsys, monkeypatch):  # fmt: skip
    if disk == "full":
        fill(small_disk, leave=12 * 1024)  # the write probe fits, the PNG does not
    else:
        read_only(small_disk)
    query = exported[0] / "class_0" / "img_000.jpg"
    sheet = small_disk / "s.png"
    assert search_main([str(exported[1]), str(query), "-k", "12", "--sheet", str(sheet)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("No space left" if disk == "full" else "Read-only") in line
    assert sorted(p.name for p in small_disk.iterdir()) == (["filler"] if disk == "full" else [])


def test_checkpoint_write_on_a_full_disk_is_an_os_error_and_keeps_the_old_file(small_disk):
    from mltrain.files import atomic_save
    from mltrain.model.checkpoint import load_checkpoint

    path = small_disk / "last.pt"
    atomic_save({"model": {"w": torch.zeros(10)}, "config": {}}, path)
    fill(small_disk, leave=64 * 1024)
    with pytest.raises(OSError) as info:  # torch's own writer would say "unexpected pos"
        atomic_save({"model": {"w": torch.zeros(200_000)}, "config": {}}, path)
    assert info.value.errno == 28 and info.value.filename == str(path)
    assert load_checkpoint(path)["model"]["w"].shape == (10,)  # the previous one, intact
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "last.pt"]


# --- evaluate.py: targets checked first, nothing half-written --------------------------------


def evaluate_cli(monkeypatch, capsys, root: Path, *args: str) -> tuple[int, str]:
    """Run evaluate.py's main in this process; (exit status, stderr)."""
    spec = importlib.util.spec_from_file_location("evaluate_cli", REPO / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sets = [*TINY_EMBED, f"data.root={root}", "model.image_size=32", "eval.amp=off",
            "eval.tsne=false", "eval.index_types=[flat]", "eval.pca_lengths=[4]",
            "eval.verification_pairs=100", "eval.one_shot_ways=[2]", "eval.one_shot_episodes=5",
            "eval.ks=[1]", "export.index=flat"]  # fmt: skip
    argv = ["evaluate.py", "--backbone", "test_efficientnet", *args]
    for s in sets:
        argv += ["--set", s]
    monkeypatch.setattr(sys, "argv", argv)
    capsys.readouterr()
    try:
        run_main(module.main)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@pytest.fixture
def eval_root(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", classes=3, per_class=4, size=(32, 32))


@pytest.mark.parametrize("flag", ["--out", "--export"])
def test_read_only_evaluation_targets_fail_before_evaluating(eval_root, small_disk, tmp_path,
                                                             flag, monkeypatch, capsys):
    read_only(small_disk)
    monkeypatch.setattr(evaluation_mod, "prepare_data", lambda *a: pytest.fail("evaluated"))
    args = ["--out", str(small_disk / "o")] if flag == "--out" else [
        "--out", str(tmp_path / "o"), "--export", str(small_disk / "bundle")]
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, *args)
    line = one_error_line(err)
    assert code == 2 and "Read-only file system" in line and flag in line
    assert not (tmp_path / "o").exists()


def test_evaluation_target_without_room_fails_before_evaluating(eval_root, small_disk,
                                                                monkeypatch, capsys):  # fmt: skip
    monkeypatch.setattr(evaluation_mod, "prepare_data", lambda *a: pytest.fail("evaluated"))
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--out", str(small_disk / "o"))
    assert code == 2 and "not enough disk space" in one_error_line(err)
    assert list(small_disk.iterdir()) == []


def test_disk_full_during_export_is_one_line_and_leaves_no_staging(eval_root, small_disk,
                                                                   tmp_path, monkeypatch,
                                                                   capsys):  # fmt: skip
    import mltrain.files as storage_mod

    monkeypatch.setattr(storage_mod, "check_free_space", lambda *a, **k: None)
    fill(small_disk, leave=64 * 1024)
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--out", str(tmp_path / "o"),
                             "--export", str(small_disk / "bundle"))  # fmt: skip
    assert code == 2 and "No space left on device" in one_error_line(err)
    assert (tmp_path / "o" / "metrics.json").is_file()  # the evaluation itself is complete
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("leave_kib", [16, 160])  # full while writing embeddings / figures
def test_disk_full_during_evaluation_is_one_line_and_leaves_nothing(eval_root, small_disk,
                                                                    leave_kib, monkeypatch,
                                                                    capsys):  # fmt: skip
    import mltrain.files as storage_mod

    monkeypatch.setattr(storage_mod, "check_free_space", lambda *a, **k: None)
    fill(small_disk, leave=leave_kib * 1024)
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--out", str(small_disk / "o"))
    assert code == 2 and "No space left on device" in one_error_line(err)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


# --- Ctrl-C: exit 130, one line, nothing half-written at the target --------------------------


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_ctrl_c_during_evaluation_leaves_no_folder(eval_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluation_mod, "compute_metrics", interrupt)
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--out", str(tmp_path / "o"))
    assert code == 130 and one_error_line(err).startswith("interrupted")
    assert leftovers(tmp_path / "o") == [] and not (tmp_path / "o").exists()


def test_ctrl_c_in_evaluation_with_the_default_folder_leaves_nothing(eval_root, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(evaluation_mod, "compute_metrics", interrupt)
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--set", "output_dir=exp")
    assert code == 130 and one_error_line(err).startswith("interrupted")
    assert not [p for p in (tmp_path / "exp").rglob("*") if p.is_file()]


def test_ctrl_c_during_export_keeps_the_complete_evaluation_only(eval_root, tmp_path,
                                                                 monkeypatch, capsys):  # fmt: skip
    monkeypatch.setattr(gallery_mod, "save_index", interrupt)
    code, err = evaluate_cli(monkeypatch, capsys, eval_root, "--out", str(tmp_path / "o"),
                             "--export", str(tmp_path / "bundle"))  # fmt: skip
    assert code == 130 and one_error_line(err).startswith("interrupted")
    assert (tmp_path / "o" / "metrics.json").is_file()
    assert not (tmp_path / "bundle").exists() and leftovers(tmp_path / "bundle") == []


def test_ctrl_c_during_add_leaves_the_bundle_untouched(bundle, tmp_path, monkeypatch, capsys):
    before = fingerprint(bundle)
    monkeypatch.setattr(add_mod, "_write_with_added", interrupt)
    assert search_main(["--add", str(bundle), str(new_images(tmp_path / "n", "zebra"))]) == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted")
    assert fingerprint(bundle) == before and leftovers(bundle) == []


def test_ctrl_c_while_writing_the_sheet_leaves_no_file(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image.Image, "save", interrupt)
    query = exported[0] / "class_0" / "img_000.jpg"
    sheet = tmp_path / "sheets" / "s.png"
    assert search_main([str(exported[1]), str(query), "--sheet", str(sheet)]) == 130
    assert one_error_line(capsys.readouterr().err).startswith("interrupted")
    assert not sheet.parent.exists() or list(sheet.parent.iterdir()) == []


@pytest.mark.parametrize("error,code,text", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (MemoryError(), 2, "out of memory"),
    (OSError(28, "No space left on device", "/d/x"), 2, "/d/x: No space left on device"),
])  # fmt: skip
def test_run_main_turns_each_kind_into_one_line(error, code, text, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as info:
        run_main(main)
    assert info.value.code == code and text in one_error_line(capsys.readouterr().err)


def test_sigterm_stops_a_command_as_ctrl_c_does_and_the_handler_is_restored(capsys):
    """`kill`, `timeout` and job schedulers send SIGTERM: the command's clean-up must run
    (staging folders removed) and it exits 130 with the interrupt line, as for Ctrl-C."""
    import os
    import signal

    from mltrain.commands.common import INTERRUPTED_LINE, run_main, term_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    cleaned = []

    def command():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        finally:
            cleaned.append(True)

    with pytest.raises(SystemExit) as info:
        run_main(command)
    assert info.value.code == 130 and cleaned == [True]
    assert capsys.readouterr().err.strip() == INTERRUPTED_LINE
    assert signal.getsignal(signal.SIGTERM) == before
    with pytest.raises(KeyboardInterrupt), term_as_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) == before
