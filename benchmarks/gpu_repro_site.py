#!/usr/bin/env python3
"""Pack the Python packages that `hmlm eval` needs and the GPU image lacks into one .tar.xz (an unpacked site folder).

    python benchmarks/gpu_repro_site.py --out .repro/site.tar.xz [--wheels DIR]

Why not carry the wheels: lm-eval's wheel is 9.1 MB, almost all of it the YAML of benchmarks we never load (the
demo tasks come with `--include-path`); unpacked and pruned, then xz-compressed, everything below is ~2 MB.
The wheels are the versions this repository's CPU tests run with (Python 3.12, manylinux x86-64, as on the GPU
image); sacrebleu is pinned to 1.5.1 because 2.x imports lxml (a 5 MB wheel) when lm-eval imports it. Pure-Python
helpers the image most likely has (requests, fsspec, ...) are included anyway: benchmarks/gpu_repro.py appends
this folder to sys.path, so the image's own versions always win and these only fill gaps.
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGES = (
    # what lm-eval 0.4.13 imports for hmlm eval (measured: modules loaded by tests/test_eval.py)
    "lm_eval==0.4.13", "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "xxhash==4.1.0",
    "sacrebleu==1.5.1", "portalocker==2.0.0", "tabulate==0.10.0", "colorama==0.4.6",
    # hmlm's recipe schema
    "omegaconf==2.4.0",
    # small pure-Python dependencies of the above that the image probably has (appended, never shadowing)
    "fsspec==2026.9.0", "requests==2.34.2", "urllib3==2.8.0", "idna==3.20", "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3", "filelock==4.3.1", "tqdm==4.70.1", "packaging==26.4",
)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "any"]


def download(dest: Path) -> list[Path]:
    for spec in PACKAGES:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(f"{name}-") for p in dest.glob("*.whl")):
            continue
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
               *PLATFORM, "-d", str(dest), spec]
        print("+", " ".join(cmd[2:]), flush=True)
        subprocess.run(cmd, check=True)
    return sorted(dest.glob("*.whl"))


def prune(site: Path) -> None:
    """Drop lm-eval's bundled benchmark definitions (subfolders of lm_eval/tasks; the package's own modules stay),
    bytecode caches and the install records (RECORD lists every dropped file; nothing here is pip-uninstalled)."""
    tasks = site / "lm_eval" / "tasks"
    for sub in tasks.iterdir() if tasks.is_dir() else ():
        if sub.is_dir() and sub.name != "__pycache__":
            shutil.rmtree(sub)
    for cache in list(site.rglob("__pycache__")):
        shutil.rmtree(cache, ignore_errors=True)
    for record in site.glob("*.dist-info/RECORD"):
        record.unlink()


def build(out: Path, wheels: Path | None) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = wheels or Path(tmp) / "wheels"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        files = download(wheel_dir)
        site = Path(tmp) / "site"
        site.mkdir()
        for whl in files:
            zipfile.ZipFile(whl).extractall(site)
        prune(site)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:xz", preset=9) as tar:
            for path in sorted(site.rglob("*")):
                tar.add(path, arcname=str(path.relative_to(site)), recursive=False)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        tmp_out.write_bytes(buf.getvalue())
        tmp_out.replace(out)
        print(f"wrote {out}: {len(files)} wheels, {out.stat().st_size / 2**20:.2f} MiB")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--wheels", type=Path, default=None, help="keep the downloaded wheels here (default: temp)")
    a = p.parse_args()
    return build(a.out, a.wheels)


if __name__ == "__main__":
    sys.exit(main())
