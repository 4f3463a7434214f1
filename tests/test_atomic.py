import os
import stat

import pytest

from vlp.atomic import atomic_write, atomic_write_json, atomic_write_text


def test_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_text(path, '{"a": 2}\n')
    assert path.read_text() == '{"a": 2}\n'
    assert os.listdir(path.parent) == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"old")

    def crash(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["model.bin"]


def test_temporary_keeps_the_suffix_and_result_is_not_owner_only(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.npy", lambda tmp: (seen.append(tmp.suffix), tmp.write_bytes(b"x")))
    assert seen == [".npy"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.npy").stat().st_mode) == 0o666 & ~umask
