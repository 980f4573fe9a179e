import json
import os
import re
import numpy as np
import pytest

from benchmarks.geneval import layout
from benchmarks.geneval.layout import (
    done_images,
    image_path,
    is_complete_png,
    load_image,
    missing_images,
    read_images_dir,
    save_image,
    write_grid,
    write_prompt_dir,
)
from rtdmd.errors import UserError

META = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


def _img(v):
    a = np.zeros((4, 5, 3), np.uint8)
    a[..., 0] = v
    a[1, 2] = (10, 20, 30)
    return a


def test_paths_and_metadata_file(tmp_path):
    assert image_path(tmp_path, 7, 3) == tmp_path / "00007" / "samples" / "00003.png"
    d = write_prompt_dir(tmp_path, 7, META)
    assert d == tmp_path / "00007" and (d / "samples").is_dir()
    assert (d / "metadata.jsonl").read_text() == json.dumps(META)  # official json.dump: no newline
    assert write_prompt_dir(tmp_path, 7, META) == d  # resuming with the same prompt is fine
    with pytest.raises(UserError, match="different prompt"):
        write_prompt_dir(tmp_path, 7, dict(META, prompt="a photo of a cat"))


def test_atomic_save_and_resume_listing(tmp_path):
    for i in range(2):
        write_prompt_dir(tmp_path, i, META)
    save_image(tmp_path, 0, 0, _img(1))
    save_image(tmp_path, 1, 1, _img(2))
    p = save_image(tmp_path, 0, 1, _img(3))
    assert sorted(os.listdir(p.parent)) == ["00000.png", "00001.png"]  # no temp files left
    np.testing.assert_array_equal(load_image(p), _img(3))
    p.write_bytes(p.read_bytes()[:-5])  # a truncated file (e.g. written by a non-atomic tool)
    assert not is_complete_png(p)
    assert done_images(tmp_path, 0, 2) == [0]
    assert missing_images(tmp_path, 2, 2) == [(0, 1), (1, 0)]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    write_prompt_dir(tmp_path, 0, META)

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(layout.os, "replace", boom)
    with pytest.raises(OSError):
        save_image(tmp_path, 0, 0, _img(1))
    assert os.listdir(tmp_path / "00000" / "samples") == []


def test_grid_layout(tmp_path):
    write_prompt_dir(tmp_path, 0, META)
    g = load_image(write_grid(tmp_path, 0, [_img(100), _img(200)], nrow=2, pad=2))
    assert g.shape == (2 + 4 + 2, 2 + 5 + 2 + 5 + 2, 3)
    assert g[0, 0, 0] == 0 and g[2, 2, 0] == 100 and g[2, 9, 0] == 200 and g[2, 7, 0] == 0


def test_read_images_dir_sorted_and_filtered(tmp_path):
    for i in (1, 0):
        write_prompt_dir(tmp_path, i, dict(META, prompt=f"p{i}"))
        for k in (1, 0):
            save_image(tmp_path, i, k, _img(k))
    write_grid(tmp_path, 0, [_img(0)])
    (tmp_path / "notes").mkdir()
    (tmp_path / "00000" / "samples" / "readme.txt").write_text("x")
    got = [(i, k, m["prompt"], p.name) for i, k, m, p in read_images_dir(tmp_path)]
    assert got == [(0, 0, "p0", "00000.png"), (0, 1, "p0", "00001.png"), (1, 0, "p1", "00000.png"), (1, 1, "p1", "00001.png")]


def test_read_images_dir_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no <index:05d>"):
        list(read_images_dir(tmp_path))
    (tmp_path / "00000" / "samples").mkdir(parents=True)
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "00000" / "metadata.jsonl")) + " is missing"):
        list(read_images_dir(tmp_path))
    (tmp_path / "00000" / "metadata.jsonl").write_text("{bad")
    with pytest.raises(UserError, match="not one readable JSON"):
        list(read_images_dir(tmp_path))
    write_prompt_dir(tmp_path, 1, META)
    (tmp_path / "00000" / "metadata.jsonl").write_text(json.dumps(META))
    os.rmdir(tmp_path / "00001" / "samples")
    with pytest.raises(UserError, match=re.escape(str(tmp_path / "00001" / "samples")) + " is missing"):
        list(read_images_dir(tmp_path))


def test_truncated_and_corrupt_png(tmp_path):
    write_prompt_dir(tmp_path, 0, META)
    p = save_image(tmp_path, 0, 0, _img(5))
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match=re.escape(str(p)) + " is not a complete PNG"):
        list(read_images_dir(tmp_path))
    # Flip a byte inside IDAT: signature and IEND stay intact, the chunk CRC does not.
    idat = good.index(b"IDAT") + 6
    bad = bytearray(good)
    bad[idat] ^= 0xFF
    p.write_bytes(bytes(bad))
    assert is_complete_png(p)
    with pytest.raises(UserError, match="corrupt PNG"):
        list(read_images_dir(tmp_path))
    with pytest.raises(UserError, match="is unreadable or corrupt"):
        load_image(p)
