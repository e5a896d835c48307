"""The runner's output files: planned before loading, never replacing a file unasked (nor an input,
ever), numbered in a folder as A1111 numbers them, and written whole or not at all."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lib_deltasampling.__main__ import main
from lib_deltasampling.errors import SettingError, UserError
from lib_deltasampling.runner import outputs
from lib_deltasampling.runner.outputs import next_sequence_number, plan_outputs, write_atomic
from lib_deltasampling.runner.png import write_png
from test_runner import files, generate, hash_cache  # noqa: F401 - fixtures


def plan(out: str, seeds=(7,), **kw) -> outputs.OutputPlan:
    kw = {"compare": False, "latent_out": None, "overwrite": False, "inputs": [], **kw}
    return plan_outputs(out, list(seeds), **kw)


def test_file_names_for_one_image_a_batch_and_compare(tmp_path):
    assert plan(str(tmp_path / "fox.png")).images == [tmp_path / "fox.png"]
    p = plan(str(tmp_path / "fox.PNG"), seeds=(7, 8), compare=True)
    assert p.images == [tmp_path / "fox-1.png", tmp_path / "fox-2.png"]
    assert p.plain_images == [tmp_path / "fox-1-nodelta.png", tmp_path / "fox-2-nodelta.png"]


@pytest.mark.parametrize("how", ["slash", "existing", "no suffix"])
def test_a_folder_gets_numbered_files_as_a1111_names_them(tmp_path, how):
    folder = tmp_path / "outputs"
    if how == "existing":
        folder.mkdir()
    out = str(folder) + ("/" if how == "slash" else "")
    p = plan(out, seeds=(42, 43), compare=True)
    assert p.images == [folder / "00000-42.png", folder / "00001-43.png"]
    assert p.plain_images == [folder / "00000-42-nodelta.png", folder / "00001-43-nodelta.png"]


def test_numbering_continues_after_the_largest_number(tmp_path):
    # A1111 images.get_next_sequence_number: the leading number of 'NNNNN-...' names, others ignored
    for name in ("00003-1.png", "00011-5-nodelta.png", "notes.txt", "abc-00099.png", "7.png"):
        (tmp_path / name).write_bytes(b"")
    assert next_sequence_number(tmp_path) == 12
    assert next_sequence_number(tmp_path / "missing") == 0
    assert plan(str(tmp_path) + "/").images == [tmp_path / "00012-7.png"]


@pytest.mark.parametrize("out, words", [("fox.jpg", "neither a .png file nor a folder"),
                                        ("fox.png.txt", "neither a .png file nor a folder")])
def test_names_the_runner_cannot_write(tmp_path, out, words):
    with pytest.raises(SettingError, match=words):
        plan(str(tmp_path / out))


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    (tmp_path / "fox-2.png").write_bytes(b"mine")
    with pytest.raises(SettingError, match=r"--out: .*fox-2.png already exists\. Pass --overwrite"):
        plan(str(tmp_path / "fox.png"), seeds=(1, 2))
    assert plan(str(tmp_path / "fox.png"), seeds=(1, 2), overwrite=True).images[1] == tmp_path / "fox-2.png"
    (tmp_path / "lat.safetensors").write_bytes(b"mine")
    with pytest.raises(SettingError, match="--latent-out: .*already exists"):
        plan(str(tmp_path / "new.png"), latent_out=str(tmp_path / "lat.safetensors"))


def test_an_input_file_is_never_an_output(tmp_path):
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    with pytest.raises(SettingError, match="is one of the input files"):
        plan(str(tmp_path / "x.png"), latent_out=str(model), overwrite=True, inputs=[model])
    assert model.read_bytes() == b"weights"


def test_a_file_in_the_way_of_a_folder(tmp_path):
    (tmp_path / "blocker").write_bytes(b"")
    with pytest.raises(SettingError, match="blocker is a file"):
        plan(str(tmp_path / "blocker" / "sub" / "x.png"))
    (tmp_path / "dir.png").mkdir()  # an existing folder is a folder, whatever its name
    assert plan(str(tmp_path / "dir.png")).images == [tmp_path / "dir.png" / "00000-7.png"]
    (tmp_path / "lat.safetensors").mkdir()
    with pytest.raises(SettingError, match="--latent-out: .*lat.safetensors is a folder"):
        plan(str(tmp_path / "x.png"), latent_out=str(tmp_path / "lat.safetensors"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(SettingError, match="not writable"):
        plan(str(locked / "x.png"))


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    path = tmp_path / "fox.png"
    path.write_bytes(b"old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(outputs.os, "fsync", disk_full)
    with pytest.raises(UserError, match="No space left on device"):
        write_atomic(path, b"new image", overwrite=True)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    path = tmp_path / "fox.png"
    path.write_bytes(b"someone else's")
    with pytest.raises(UserError, match="appeared while generating"):
        write_atomic(path, b"ours", overwrite=False)
    assert path.read_bytes() == b"someone else's" and len(list(tmp_path.iterdir())) == 1
    assert write_atomic(tmp_path / "a" / "b" / "new.png", b"ours", overwrite=False).read_bytes() == b"ours"


def test_written_files_have_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_png(tmp_path / "x.png", np.zeros((8, 8, 3), np.uint8))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# ------------------------------------------------------------------ end to end

def test_runner_refuses_to_overwrite_before_loading_anything(tmp_path, capsys):
    empty = tmp_path / "empty.safetensors"  # loading it would fail with "the file is empty"
    empty.write_bytes(b"")
    (tmp_path / "fox.png").write_bytes(b"mine")
    code = main(["generate", "--target", str(empty), "--source", str(empty), "--out", str(tmp_path / "fox.png"),
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "already exists" in err and "--overwrite" in err and "empty" not in err
    assert (tmp_path / "fox.png").read_bytes() == b"mine"


def test_runner_numbers_images_in_a_folder_and_overwrites_only_when_asked(files, tmp_path):  # noqa: F811
    folder = tmp_path / "outputs"
    assert generate(files, Path(str(folder) + "/"), "--batch", "2") == 0  # generate() passes str(out)
    assert sorted(p.name for p in folder.iterdir()) == ["00000-7.png", "00001-8.png"]
    assert "Seed: 8," in Image.open(folder / "00001-8.png").info["parameters"]
    assert generate(files, folder) == 0
    assert (folder / "00002-7.png").is_file()
    single = tmp_path / "one.png"
    assert generate(files, single) == 0 and generate(files, single) == 2
    before = single.stat().st_mtime_ns
    assert generate(files, single, "--overwrite", "--seed", "9") == 0
    assert single.stat().st_mtime_ns >= before and "Seed: 9," in Image.open(single).info["parameters"]
