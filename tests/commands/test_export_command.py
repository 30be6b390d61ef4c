"""`mltrain export` as a user runs it: wrong index arguments are named in one line before
any image is embedded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mltrain.__main__ import main
from tests.conftest import TINY_EMBED, write_image_folder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("index, args, words", [
    ("hnsw", "{nlist: 1000}", ": hnsw takes M, ef_construction, ef_search (got nlist)"),
    ("hnsw", "{efSearch: 8, M: 16}", ": hnsw takes M, ef_construction, ef_search (got efSearch)"),
    ("flat", "{dim: 8}", ": flat takes no arguments (got dim)"),
    ("ivf_flat", "{M: 8}", ": ivf_flat takes nlist, nprobe (got M)"),
    ("ivf_hnsw", "{efSearch: 8}", ": ivf_hnsw takes nlist, nprobe, ef_search, M, codec (got "
                                  "efSearch)"),
    ("auto", "{M: 16}", " need a named export.index (auto picks hnsw or ivf_hnsw by gallery "
                        "size)"),
])  # fmt: skip
def test_wrong_index_args_name_only_the_users_keys(tmp_path, capsys, monkeypatch, index, args,
                                                   words):  # fmt: skip
    import mltrain.retrieval.export as export_mod

    monkeypatch.setattr(export_mod, "export_bundle",
                        lambda *a, **k: pytest.fail("images were embedded"))
    root = write_image_folder(tmp_path / "data", 2, 4, (32, 32))
    sets = [f"data.root={root}", "model.backbone=test_efficientnet", *TINY_EMBED,
            f"export.index={index}", f"export.index_args={args}"]  # fmt: skip
    argv = ["export", "--backbone", "test_efficientnet", "--out", str(tmp_path / "b")]
    with pytest.raises(SystemExit) as e:
        main([*argv, *(x for s in sets for x in ("--set", s))])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: export.index_args{words}\n"
    assert not (tmp_path / "b").exists()


def test_skipped_images_are_named_inline_not_in_a_file_export_never_writes(tmp_path, capsys):
    """Export has no run folder: a message that sent the user to bad_images.txt pointed at
    nothing."""
    root = write_image_folder(tmp_path / "data", 2, 4, (32, 32))
    (root / "class_0" / "broken.jpg").write_text("not an image")
    sets = [f"data.root={root}", *TINY_EMBED, "data.bad_images=skip", "export.index=flat"]
    argv = ["export", "--backbone", "test_efficientnet", "--out", str(tmp_path / "b")]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    err = capsys.readouterr().err
    assert f"skipping 1 unreadable image:\n  {root / 'class_0' / 'broken.jpg'}: not an image" in err
    assert ".txt" not in err and not list(tmp_path.rglob("*.txt"))
    assert (tmp_path / "b" / "manifest.json").is_file()


def test_a_thin_index_note_is_printed_once(tmp_path, capsys):
    """The early check before embedding and the export itself both judge the index: the note
    used to be printed by each."""
    root = write_image_folder(tmp_path / "data", 2, 4, (32, 32))
    sets = [f"data.root={root}", *TINY_EMBED, "data.split=none", "export.index=ivf_flat"]
    argv = ["export", "--backbone", "test_efficientnet", "--out", str(tmp_path / "b")]
    assert main([*argv, *(x for s in sets for x in ("--set", s))]) == 0
    err = capsys.readouterr().err
    assert err.count("note: export index ivf_flat: 1 coarse lists trained on 8 rows") == 1


def _checkpoint_with(tmp_path, root, model_edit: dict) -> str:
    """A checkpoint of a tiny random model whose stored config is edited as an older
    version of mltrain could have written it."""
    from mltrain.config import to_dict
    from mltrain.files import atomic_save
    from tests.conftest import tiny_embedder

    embedder = tiny_embedder(root)
    config = to_dict(embedder.cfg)
    config["model"].update(model_edit)
    path = tmp_path / "old.pt"
    atomic_save({"model": embedder.model.state_dict(), "config": config, "train_classes": []},
                path)  # fmt: skip
    return str(path)


def test_a_stored_training_only_key_this_code_refuses_is_read_at_its_default(tmp_path, capsys,
                                                                          monkeypatch):  # fmt: skip
    """Frozen stages decide what trains, never what a model embeds: export goes on, with a
    note naming the checkpoint; the bundle records the value it used and loads. The model is
    built twice, the checkpoint file read once."""
    import json

    import mltrain.model.checkpoint as checkpoint_mod
    from mltrain.config import Config
    from mltrain.retrieval.bundle import load_bundle

    root = write_image_folder(tmp_path / "data", 2, 4, (32, 32))
    ckpt = _checkpoint_with(tmp_path, root, {"frozen_stages": 40})
    sets = [f"data.root={root}", *TINY_EMBED, "export.index=flat"]
    reads = []
    real_read = checkpoint_mod._read
    monkeypatch.setattr(checkpoint_mod, "_read", lambda p: reads.append(p) or real_read(p))
    assert main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "b"),
                 *(x for s in sets for x in ("--set", s))]) == 0  # fmt: skip
    assert reads == [Path(ckpt)]
    err = capsys.readouterr().err
    assert f"note: checkpoint {ckpt}: its stored model.frozen_stages: 40 >= " in err
    default = Config().model.frozen_stages
    assert (f"only training reads model.frozen_stages, so it is read at its default "
            f"({json.dumps(default)}) here") in err  # fmt: skip
    assert load_bundle(tmp_path / "b").manifest["config"]["model"]["frozen_stages"] == default


def test_a_stored_config_that_does_not_fit_names_the_checkpoint_and_the_set(tmp_path, capsys):
    root = write_image_folder(tmp_path / "data", 2, 4, (32, 32))
    ckpt = _checkpoint_with(tmp_path, root, {"pooling": {"name": "retired_pool", "args": {}}})
    with pytest.raises(SystemExit) as e:
        main(["export", "--checkpoint", ckpt, "--out", str(tmp_path / "b"),
              "--set", f"data.root={root}"])  # fmt: skip
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: checkpoint {ckpt}: its stored config does not fit this "
                          "version of mltrain (") and "retired_pool" in err  # fmt: skip
    assert err.endswith("override the stored value with --set KEY=VALUE (the checkpoint is not "
                        "changed)\n") and err.count("\n") == 1  # fmt: skip
    assert not (tmp_path / "b").exists()
