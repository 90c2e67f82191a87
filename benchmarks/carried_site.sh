# Sourced by the GPU scripts (gpu_repro.sh, gpu_posthoc.sh): `unpack_site PYTHON TARBALL NAME` unpacks a site
# tarball from benchmarks/gpu_repro_site.py (packages the GPU image lacks) and sets SITE to the folder, which the
# python drivers append to sys.path. The packages go under the interpreter's prefix where it is writable (a fresh
# GPU machine: yes), because datasets fingerprints with dill, and dill pickles any module outside sys.prefix by
# value: from /tmp, lm-eval's and datasets' own modules would be pickled whole (a CPU rehearsal with pyarrow outside
# the prefix failed that way on pyarrow's MonthDayNano; with the packages under the prefix it passed).
unpack_site() {
  local py="$1" tarball="$2" name="$3" prefix
  prefix=$("$py" -c 'import os, sys; print(os.path.realpath(sys.prefix))')
  if [ -w "$prefix" ]; then
    SITE="$prefix/$name"
  else
    SITE="${TMPDIR:-/tmp}/$name"
    echo "$name: $prefix is not writable; packages go to $SITE (hmlm eval may fail to fingerprint)" >&2
  fi
  rm -rf "$SITE"
  mkdir -p "$SITE"
  if [ -f "$tarball" ]; then
    tar -xJf "$tarball" -C "$SITE"
  fi
}
