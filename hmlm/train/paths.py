"""The paths a recipe names, checked before anything is written (light: no torch, no Lightning, so `hmlm index`
uses it too). Each failure is one RecipeError naming the recipe file and the key."""
from __future__ import annotations

import os
from pathlib import Path

from ..config import Recipe, RecipeError


def bad_key(source: str, key: str, msg: str) -> RecipeError:
    return RecipeError(f"{source}: key `{key}`: {msg}")


def check_paths(recipe: Recipe, source: str) -> None:
    """out_dir and index.dir can be directories we may write; the corpus (and tokenizer file) exist when the index
    still has to be built."""
    for key, value in (("out_dir", recipe.out_dir), ("index.dir", recipe.index.dir)):
        writable_dir(source, key, Path(value))
    index_dir = Path(recipe.index.dir)
    if (index_dir / "index.json").is_file():
        return
    if recipe.data.corpus != "bundled":
        readable(source, "data.corpus", Path(recipe.data.corpus))
    if recipe.data.tokenizer.kind == "file" and recipe.data.tokenizer.path:
        readable(source, "data.tokenizer.path", Path(recipe.data.tokenizer.path))


def writable_dir(source: str, key: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise bad_key(source, key, f"{path} is a file, not a directory; remove it or choose another {key}")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise bad_key(source, key, f"{path} cannot be created: {probe} is a file")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise bad_key(source, key, f"{path} is not writable ({probe} denies write access to this user)")


def readable(source: str, key: str, path: Path) -> None:
    if not path.exists():
        raise bad_key(source, key, f"{path} does not exist")
    target = path if path.is_file() else None
    try:
        if target is not None:
            with open(target, "rb") as f:
                f.read(1)
        else:
            os.listdir(path)
    except OSError as exc:
        raise bad_key(source, key, f"cannot read {path} ({exc.strerror or exc})") from None
