"""Artifacts written through the atomic helpers get the permissions of a plain open()/mkdir, not mkstemp's 0600."""
from __future__ import annotations

import os
import stat

from hmlm.utils import atomic_dir, atomic_write_path, write_json


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_atomic_files_and_dirs_get_the_umask_mode(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    mask = _umask()
    write_json(tmp_path / "report.json", {"a": 1})
    with atomic_write_path(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"x")
    with atomic_write_path(tmp_path / "tree.safetensors") as tmp:
        save_file({"a": np.zeros(2)}, str(tmp))          # safetensors itself creates 0600 files
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "model.json").write_text("{}")
        (tmp / "bank").mkdir()
        save_file({"a": np.zeros(2)}, str(tmp / "bank" / "l0.safetensors"))
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    files = ["report.json", "plot.png", "tree.safetensors", "model/model.json", "model/bank/l0.safetensors"]
    for f in files:
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~mask, f
    for d in ("model", "model/bank"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o777 & ~mask
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp files left behind
