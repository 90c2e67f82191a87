"""Entity mentions in a training corpus, counted without the corpus: a compact, exact index of its words.

`hmlm fit` writes the index into the model directory (`mentions/`): the training split's text as case-folded words
(`[^\\W_]+`), one integer per word, documents separated by id 0, plus the vocabulary. Counting names then needs no
corpus and no tokenizer: a name is looked up as a sequence of word ids. Mentions are whole-word, case-insensitive,
leftmost-longest and non-overlapping within a document ("Papua New Guinea" is not also a mention of "Guinea"); a
name shared by several keys counts for each of them.

`hmlm index` writes the same folder into the index directory (`write_mention_dir`), so that an index carried to
another machine without its corpus still gives every model trained from it its mentions:

    mentions/words.safetensors   word ids of the training split, documents separated by 0
    mentions/vocab.txt           the words, one a line (id 1 first)
    mentions/paths.safetensors   the tree path of each training document, in the same order
    mentions/facts_meta.json     the bundled corpus's recorded repeat counts, when the corpus has them

An index built before this has no such folder: its mentions are built from the corpus at export, while the corpus
is still where `hmlm index` read it (`index_training_split`).

Size: 2 bytes per word while the vocabulary has fewer than 65,535 words, 4 beyond; the bundled corpus's 1.0M
training words take 2.0 MB plus 0.5 MB of vocabulary. Corpora of more than MAX_WORDS words are not indexed (the
model directory would carry a second copy of the corpus); evaluation then counts in the corpus itself while it is
still where `hmlm index` read it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

MAX_WORDS = 20_000_000
# BPE tokens per word of English text is about 1.3; an index whose training tokens exceed this is not read at all
MAX_TOKENS = int(MAX_WORDS * 1.5)

_WORD = re.compile(r"[^\W_]+")
_SEP = 0   # document boundary: no name contains it, so no mention spans two documents


def words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


@dataclass
class MentionIndex:
    vocab: list[str]                 # vocab[0] == "" is the document separator
    ids: np.ndarray                  # [n] word ids (uint16 or uint32), documents separated by 0
    _lookup: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    _order: np.ndarray | None = field(default=None, init=False, repr=False)
    _sorted: np.ndarray | None = field(default=None, init=False, repr=False)
    _seps: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._lookup = {w: i for i, w in enumerate(self.vocab)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "MentionIndex":
        lookup: dict[str, int] = {"": _SEP}
        out: list[int] = []
        for text in texts:
            # setdefault evaluates len() before inserting: a new word gets the next id
            out.extend(lookup.setdefault(w, len(lookup)) for w in words(text))
            out.append(_SEP)
        dtype = np.uint16 if len(lookup) <= np.iinfo(np.uint16).max else np.uint32
        return cls(list(lookup), np.asarray(out, dtype=dtype))

    @property
    def n_words(self) -> int:
        return int(len(self.ids) - np.count_nonzero(self.ids == _SEP))

    @property
    def n_documents(self) -> int:
        return int(np.count_nonzero(self.ids == _SEP))

    # ---- files -------------------------------------------------------------------------------------

    def save(self, directory: Path) -> dict[str, str]:
        """Write words.safetensors and vocab.txt into `directory`; returns {file name: sha256}."""
        from safetensors.numpy import save_file

        from ..utils import sha256_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({"ids": self.ids}, str(directory / "words.safetensors"))
        (directory / "vocab.txt").write_text("\n".join(self.vocab[1:]) + "\n", encoding="utf-8")
        return {name: sha256_file(directory / name) for name in ("words.safetensors", "vocab.txt")}

    @classmethod
    def load(cls, directory: Path) -> "MentionIndex":
        from safetensors.numpy import load_file

        directory = Path(directory)
        vocab = [""] + (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        return cls(vocab, load_file(str(directory / "words.safetensors"))["ids"])

    # ---- counting ----------------------------------------------------------------------------------

    def _starts(self, word: int) -> np.ndarray:
        if self._order is None:   # an inverted index: the positions of each word id, found by binary search
            self._order = np.argsort(self.ids, kind="stable")
            self._sorted = self.ids[self._order]
        assert self._sorted is not None
        lo, hi = np.searchsorted(self._sorted, [word, word + 1])
        return self._order[lo:hi]

    def _mentions(self, names: Mapping[str, Sequence[str]]) -> tuple[list[tuple[int, set[str]]], list[str]]:
        """([(word position of a mention, keys it counts for)], keys): the mentions of each key's names."""
        owners: dict[tuple[int, ...], set[str]] = {}
        for key, spellings in names.items():
            for s in spellings:
                phrase = tuple(self._lookup.get(w, -1) for w in words(s))
                if phrase and -1 not in phrase:   # a word the corpus never has: no mention
                    owners.setdefault(phrase, set()).add(key)
        matches: list[tuple[int, int, tuple[int, ...]]] = []
        n = len(self.ids)
        for phrase in owners:
            pos = self._starts(phrase[0])
            pos = pos[pos + len(phrase) <= n]
            for k in range(1, len(phrase)):
                pos = pos[self.ids[pos + k] == phrase[k]]
            matches.extend((int(p), -len(phrase), phrase) for p in pos)
        found: list[tuple[int, set[str]]] = []
        cursor = 0
        for start, neg_len, phrase in sorted(matches):   # leftmost first, then longest first
            if start < cursor:
                continue
            found.append((start, owners[phrase]))
            cursor = start - neg_len
        return found, list(names)

    def count(self, names: Mapping[str, Sequence[str]]) -> dict[str, int]:
        """Mentions of each key's names (see the module docstring)."""
        found, keys = self._mentions(names)
        counts = {key: 0 for key in keys}
        for _, owners in found:
            for key in owners:
                counts[key] += 1
        return counts

    # ---- documents ---------------------------------------------------------------------------------

    def _separators(self) -> np.ndarray:
        if self._seps is None:
            self._seps = np.flatnonzero(self.ids == _SEP)
        return self._seps

    def mention_documents(self, names: Sequence[str]) -> np.ndarray:
        """Per training document (in the split's order), how many times any of `names` is mentioned in it."""
        found, _ = self._mentions({"_": list(names)})
        seps = self._separators()
        docs = np.searchsorted(seps, np.asarray([p for p, _ in found], dtype=np.int64))
        return np.bincount(docs, minlength=len(seps)).astype(np.int64)

    def document_words(self, doc: int) -> list[str]:
        """Document `doc`'s words as indexed (case-folded, punctuation dropped)."""
        seps = self._separators()
        start = 0 if doc == 0 else int(seps[doc - 1]) + 1
        return [self.vocab[i] for i in self.ids[start:int(seps[doc])].tolist()]


def count_mentions(texts: Iterable[str], names: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Mentions of each key's names in `texts` (see the module docstring)."""
    return MentionIndex.from_texts(texts).count(names)


def training_texts(index_dir: Path) -> Iterator[str]:
    """Texts of the training-split documents of an index: its corpus re-read, split by documents.jsonl."""
    from ..data.corpus import iter_corpus

    index_dir = Path(index_dir)
    meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    with open(index_dir / "documents.jsonl", encoding="utf-8") as f:
        splits = [json.loads(line)["split"] for line in f]
    for doc, split in zip(iter_corpus(meta["corpus"], max_docs=meta["data"].get("max_docs")), splits):
        if split == "train":
            yield doc.text


MENTIONS_DIR = "mentions"
FACTS_FILE = "facts_meta.json"


def training_split_mentions(texts: Iterable[str], train_tokens: int) -> tuple[MentionIndex | None, str]:
    """The mention index of a training split's texts, or None and the reason it is not built (the split is larger
    than a model directory indexes). `train_tokens` (from the index's counts) refuses a large split before reading."""
    if train_tokens > MAX_TOKENS:
        return None, (f"the training split has {train_tokens:,} tokens, more than the {MAX_TOKENS:,} a model "
                      "directory indexes; counts are read from the corpus while it exists")
    mentions = MentionIndex.from_texts(texts)
    if mentions.n_words > MAX_WORDS:
        return None, (f"the training split has {mentions.n_words:,} words, more than the {MAX_WORDS:,} a model "
                      "directory indexes; counts are read from the corpus while it exists")
    return mentions, ""


def write_mention_dir(directory: Path, mentions: MentionIndex | None, paths: np.ndarray | None,
                      facts: Path | None = None) -> dict[str, str]:
    """Write the mentions folder (module docstring) into `directory`: the word index and the training documents'
    paths [documents, levels] when `mentions` is given, a copy of `facts` (facts_meta.json) when it is. The one
    writer of this folder, for the index (`hmlm index`) and for a model exported from an older index. Returns
    {file name: sha256}."""
    import shutil

    from safetensors.numpy import save_file

    from ..utils import sha256_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    if mentions is not None:
        if paths is None or len(paths) != mentions.n_documents:
            raise ValueError(f"{directory}: {mentions.n_documents} training documents but "
                             f"{None if paths is None else len(paths)} paths")
        sums.update(mentions.save(directory))
        save_file({"paths": np.ascontiguousarray(paths, dtype=np.int32)}, str(directory / "paths.safetensors"))
        sums["paths.safetensors"] = sha256_file(directory / "paths.safetensors")
    if facts is not None:
        shutil.copyfile(facts, directory / FACTS_FILE)
        sums[FACTS_FILE] = sha256_file(directory / FACTS_FILE)
    return sums


def stored_mentions(index_dir: Path) -> Path | None:
    """The index's own mentions folder with a word index (written by `hmlm index` since it stores one), else None."""
    folder = Path(index_dir) / MENTIONS_DIR
    return folder if (folder / "words.safetensors").is_file() else None


def index_training_split(index_dir: Path) -> tuple[MentionIndex | None, str]:
    """The mention index of an index's training split: the one `hmlm index` stored, else built from the corpus (an
    index made before indexes stored it), else None and the reason."""
    index_dir = Path(index_dir)
    stored = stored_mentions(index_dir)
    if stored is not None:
        return MentionIndex.load(stored), ""
    meta = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    if "mentions" in meta:   # an index that stores its mentions and recorded why it has none
        return None, meta["mentions"].get("missing") or f"{index_dir / MENTIONS_DIR} is missing"
    corpus = Path(meta["corpus"])
    if not corpus.exists():
        return None, f"the training corpus {corpus} no longer exists"
    return training_split_mentions(training_texts(index_dir), int(meta.get("counts", {}).get("train_tokens", 0)))
