"""moyu.atomic: files written whole or not at all."""
import json
import os

import pytest

from moyu.atomic import atomic_path, write_bytes_atomic, write_json_atomic, write_text_atomic


def test_writers_create_the_folder_and_return_the_path(tmp_path):
    assert write_bytes_atomic(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    write_text_atomic(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    write_json_atomic(str(tmp_path / "j.json"), {"x": [1, 2]}, indent=1)
    assert (tmp_path / "j.json").read_text() == json.dumps({"x": [1, 2]}, indent=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "j.json", "t.md"]


def test_mode_follows_the_umask_not_mkstemp(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "f", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o640


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target, suffix=".png") as tmp:
            assert tmp.parent == tmp_path and tmp.name.endswith(".png") and tmp != target
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
    with pytest.raises(TypeError):
        write_json_atomic(target, {"x": object()})
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.png"]
