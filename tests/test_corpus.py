"""Corpus readers: every format, directories, and that each error names the file and line/row."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmlm.data.corpus import CorpusError, Document, iter_corpus, read_corpus


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_jsonl_ids_default_and_explicit(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": "alpha"}, {"text": "beta", "id": "b"}, {"text": "g", "id": 7}])
    docs = read_corpus(f)
    assert docs == [Document("c.jsonl:1", "alpha"), Document("b", "beta"), Document("7", "g")]


def test_jsonl_skips_blank_lines_and_whitespace_texts(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "   \\n"}\n{"text": "b"}\n', encoding="utf-8")
    assert [(d.id, d.text) for d in read_corpus(f)] == [("c.jsonl:1", "a"), ("c.jsonl:4", "b")]


def test_document_is_frozen():
    d = Document("x", "y")
    with pytest.raises(AttributeError):
        d.text = "z"  # type: ignore[misc]


def test_txt_blocks(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("first doc\nstill first\n\n\n  \nsecond doc\r\n\r\nthird\n", encoding="utf-8")
    docs = read_corpus(f)
    assert docs == [Document("notes.txt:1", "first doc\nstill first"), Document("notes.txt:6", "second doc"),
                    Document("notes.txt:8", "third")]


def test_parquet_with_and_without_id(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["one", " ", "three"], "id": ["a", "b", "c"]}), f)
    assert read_corpus(f) == [Document("a", "one"), Document("c", "three")]
    g = tmp_path / "q.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "other": [1, 2]}), g)
    assert [d.id for d in read_corpus(g)] == ["q.parquet:0", "q.parquet:1"]


def test_directory_recursive_sorted(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a").mkdir()
    write_jsonl(tmp_path / "b" / "x.jsonl", [{"text": "from b"}])
    write_jsonl(tmp_path / "a" / "x.jsonl", [{"text": "from a"}])
    (tmp_path / "z.txt").write_text("from z\n", encoding="utf-8")
    (tmp_path / "README.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()
    write_jsonl(tmp_path / ".hidden" / "h.jsonl", [{"text": "hidden"}])
    docs = read_corpus(tmp_path)
    # same file name in two folders: default ids stay unique because they use the relative path
    assert [(d.id, d.text) for d in docs] == [("a/x.jsonl:1", "from a"), ("b/x.jsonl:1", "from b"),
                                              ("z.txt:1", "from z")]


def test_max_docs_and_streaming(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"text": f"doc {i}"} for i in range(10)])
    assert len(read_corpus(f, max_docs=3)) == 3
    it = iter_corpus(f)
    assert next(it).text == "doc 0"


@pytest.mark.parametrize("content, pattern", [
    ('{"text": "ok"}\n{"text": "broken"\n', r"c\.jsonl:2: invalid JSON"),
    ('{"text": "ok"}\n{"title": "x"}\n', r"c\.jsonl:2: record has no `text` field \(fields: title\)"),
    ('{"text": 5}\n', r"c\.jsonl:1: `text` must be a string, got int"),
    ('[1, 2]\n', r"c\.jsonl:1: expected a JSON object"),
    ('{"text": "a", "id": [1]}\n', r"c\.jsonl:1: `id` must be a string or an integer"),
    ('{"text": "a", "id": "x"}\n{"text": "b"}\n{"text": "c", "id": "x"}\n',
     r"c\.jsonl:3: duplicate document id 'x' \(first seen at .*c\.jsonl:1\)"),
    ('\n  \n{"text": "  "}\n', r"corpus is empty"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, pattern):
    f = tmp_path / "c.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=pattern):
        read_corpus(f)


def test_non_utf8_names_line_and_byte_offset(tmp_path):
    f = tmp_path / "c.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: not valid UTF-8: byte 0xe9 at byte offset 28"):
        read_corpus(f)
    t = tmp_path / "t.txt"
    t.write_bytes(b"fine\n\nbad \xff here\n")
    with pytest.raises(CorpusError, match=r"t\.txt:3: not valid UTF-8: byte 0xff at byte offset 10"):
        read_corpus(t)


def test_duplicate_ids_across_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "id": "same"}])
    pq.write_table(pa.table({"text": ["y", "z"], "id": ["other", "same"]}), tmp_path / "b.parquet")
    msg = r"b\.parquet: row 1: duplicate document id 'same' \(first seen at .*a\.jsonl:1\)"
    with pytest.raises(CorpusError, match=msg):
        read_corpus(tmp_path)


def test_parquet_errors(tmp_path):
    f = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"]}), f)
    with pytest.raises(CorpusError, match=r"p\.parquet: parquet file has no `text` column \(columns: body\)"):
        read_corpus(f)
    pq.write_table(pa.table({"text": [1, 2]}), f)
    with pytest.raises(CorpusError, match=r"p\.parquet: column `text` must hold strings"):
        read_corpus(f)
    pq.write_table(pa.table({"text": ["a", None]}), f)
    with pytest.raises(CorpusError, match=r"p\.parquet: row 1: `text` is null"):
        read_corpus(f)
    f.write_bytes(b"not parquet at all")
    with pytest.raises(CorpusError, match=r"p\.parquet: cannot read as parquet"):
        read_corpus(f)


def test_path_errors(tmp_path):
    with pytest.raises(CorpusError, match=r"missing\.jsonl: corpus path does not exist"):
        read_corpus(tmp_path / "missing.jsonl")
    bad = tmp_path / "data.csv"
    bad.write_text("text\nx\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"data\.csv: unknown corpus file extension '\.csv'"):
        read_corpus(bad)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CorpusError, match=r"empty: directory holds no corpus files"):
        read_corpus(empty_dir)
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"blank\.txt: corpus is empty"):
        read_corpus(tmp_path / "blank.txt")


def test_corpus_error_is_value_error():
    assert issubclass(CorpusError, ValueError)
