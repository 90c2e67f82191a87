"""Corpus readers: .jsonl, .txt, .parquet files or a directory of them -> a list of Documents.

Formats (one Document per record):
  .jsonl    one JSON object per line with a string `text` and an optional `id` (string or integer);
            blank lines are skipped. Default id: `<file>:<line>` (lines count from 1).
  .txt      one document per block of lines separated by one or more blank (whitespace-only) lines;
            a block's lines are joined with "\\n". Default id: `<file>:<first line of the block>`.
  .parquet  a string column `text` and an optional `id` column. Default id: `<file>:<row>`
            (rows count from 0, as in pyarrow/pandas).
  directory every file with one of the extensions above, recursively, in sorted path order; hidden
            files and folders (name starting with ".") are skipped. `<file>` in default ids is then the
            path relative to the directory, so that two `data.jsonl` in different folders don't clash.

Documents whose text is empty or whitespace-only are skipped (they carry nothing to learn or route).
Every problem raises CorpusError naming the file and the line (or row) so the user can fix the data.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

EXTENSIONS = (".jsonl", ".txt", ".parquet")


class CorpusError(ValueError):
    """Bad corpus input; the message names the file and line/row."""


@dataclass(frozen=True, slots=True)
class Document:
    id: str
    text: str


def iter_corpus(path: str | Path, *, max_docs: int | None = None) -> Iterator[Document]:
    """Stream documents from `path` (see module docstring), checking ids for duplicates as it goes.

    Raises CorpusError for any bad input, including a corpus that yields no documents at all.
    """
    root = Path(path)
    if max_docs is not None and max_docs < 1:
        raise CorpusError(f"max_docs must be >= 1 or None, got {max_docs}")
    if not root.exists():
        raise CorpusError(f"{root}: corpus path does not exist")
    files = _corpus_files(root)
    seen: dict[str, str] = {}  # id -> where it was first seen, to name both places of a duplicate
    n = 0
    for file in files:
        # default ids use the name relative to the corpus root: stable when the corpus moves
        name = file.name if file == root else file.relative_to(root).as_posix()
        for doc, where in _read_file(file, name):
            if doc.id in seen:
                raise CorpusError(f"{where}: duplicate document id {doc.id!r} (first seen at {seen[doc.id]})")
            seen[doc.id] = where
            yield doc
            n += 1
            if max_docs is not None and n >= max_docs:
                return
    if n == 0:
        raise CorpusError(f"{root}: corpus is empty (no document with non-whitespace text in "
                          f"{', '.join(str(f) for f in files)})")


def read_corpus(path: str | Path, *, max_docs: int | None = None) -> list[Document]:
    """All documents of `path` (at most `max_docs`, in file order). See module docstring for formats."""
    return list(iter_corpus(path, max_docs=max_docs))


def _corpus_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() not in EXTENSIONS:
            raise CorpusError(f"{root}: unknown corpus file extension {root.suffix!r}; "
                              f"expected one of {', '.join(EXTENSIONS)} or a directory of such files")
        return [root]
    files = sorted(
        (p for p in root.rglob("*")
         if p.is_file() and p.suffix.lower() in EXTENSIONS
         and not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise CorpusError(f"{root}: directory holds no corpus files ({', '.join(EXTENSIONS)})")
    return files


def _read_file(file: Path, name: str) -> Iterator[tuple[Document, str]]:
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(file, name)
    if suffix == ".txt":
        return _read_txt(file, name)
    return _read_parquet(file, name)


def _decode(raw: bytes, file: Path, line_no: int, line_start: int) -> str:
    """UTF-8 decode one line; on failure name file, line and the absolute byte offset of the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start:exc.start + 1].hex()
        raise CorpusError(f"{file}:{line_no}: not valid UTF-8: byte 0x{bad} at byte offset "
                          f"{line_start + exc.start} of the file (column {exc.start + 1} of the line); "
                          "re-encode the file as UTF-8") from None


def _read_jsonl(file: Path, name: str) -> Iterator[tuple[Document, str]]:
    offset = 0
    with open(file, "rb") as fh:
        for line_no, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            line = _decode(raw, file, line_no, start).strip()
            if not line:
                continue
            where = f"{file}:{line_no}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            if not isinstance(rec, dict):
                raise CorpusError(f"{where}: expected a JSON object with a `text` field, "
                                  f"got {type(rec).__name__}")
            if "text" not in rec:
                raise CorpusError(f"{where}: record has no `text` field (fields: {', '.join(sorted(rec)) or 'none'})")
            text = rec["text"]
            if not isinstance(text, str):
                raise CorpusError(f"{where}: `text` must be a string, got {type(text).__name__}")
            doc_id = _check_id(rec.get("id"), where, default=f"{name}:{line_no}")
            if text.strip():
                yield Document(doc_id, text), where


def _check_id(value: object, where: str, default: str) -> str:
    if value is None:
        return default
    # bool is an int subclass, but `"id": true` is surely a mistake
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise CorpusError(f"{where}: `id` must be a string or an integer, got {type(value).__name__}")
    return str(value)


def _read_txt(file: Path, name: str) -> Iterator[tuple[Document, str]]:
    block: list[str] = []
    block_line = 0
    offset = 0
    with open(file, "rb") as fh:
        # split on b"\n" only (not str.splitlines, which also splits on \x0c, \u2028, ...) so that
        # line numbers match what an editor shows
        for line_no, raw in enumerate(fh, start=1):
            start, offset = offset, offset + len(raw)
            line = _decode(raw, file, line_no, start).rstrip("\r\n")
            if line.strip():
                if not block:
                    block_line = line_no
                block.append(line)
            elif block:
                yield Document(f"{name}:{block_line}", "\n".join(block)), f"{file}:{block_line}"
                block = []
    if block:
        yield Document(f"{name}:{block_line}", "\n".join(block)), f"{file}:{block_line}"


def _read_parquet(file: Path, name: str) -> Iterator[tuple[Document, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{file}: cannot read as parquet: {exc}") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise CorpusError(f"{file}: parquet file has no `text` column (columns: {', '.join(schema.names)})")
    text_type = schema.field("text").type
    if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)):
        raise CorpusError(f"{file}: column `text` must hold strings, got type {text_type}")
    has_id = "id" in schema.names
    columns = ["text", "id"] if has_id else ["text"]
    row = 0
    # stream batch by batch so a large file never has to fit in memory as Python strings at once
    for batch in pf.iter_batches(batch_size=8192, columns=columns):
        texts = batch.column("text").to_pylist()
        ids = batch.column("id").to_pylist() if has_id else [None] * len(texts)
        for text, doc_id in zip(texts, ids):
            where = f"{file}: row {row}"
            if text is None:
                raise CorpusError(f"{where}: `text` is null")
            doc_id = _check_id(doc_id, where, default=f"{name}:{row}")
            row += 1
            if text.strip():
                yield Document(doc_id, text), where
