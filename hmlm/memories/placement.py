"""Which anchor layers carry memory: all (paper default), the first/middle/last N, or an explicit list."""
from __future__ import annotations


def parse_placement(spec: str, n_layers: int | None) -> list[int] | None:
    """Return the sorted layer indices for `spec`; with n_layers=None only the syntax is checked."""
    spec = spec.strip()
    if spec == "all":
        return list(range(n_layers)) if n_layers is not None else None
    kind, sep, arg = spec.partition(":")
    if not sep or kind not in ("first", "middle", "last", "layers"):
        raise ValueError(f"got {spec!r}, expected all, first:N, middle:N, last:N or layers:i,j,...")
    if kind == "layers":
        try:
            layers = sorted({int(t) for t in arg.split(",") if t.strip()})
        except ValueError:
            raise ValueError(f"got {spec!r}: layers:... takes comma-separated integers") from None
        if not layers:
            raise ValueError(f"got {spec!r}: layers:... needs at least one layer index")
        if n_layers is not None and (layers[0] < 0 or layers[-1] >= n_layers):
            raise ValueError(f"got {spec!r}: layer indices must be in [0, {n_layers})")
        return layers if n_layers is not None else None
    try:
        n = int(arg)
    except ValueError:
        raise ValueError(f"got {spec!r}: {kind}:N takes an integer N") from None
    if n < 1:
        raise ValueError(f"got {spec!r}: N must be >= 1")
    if n_layers is None:
        return None
    if n > n_layers:
        raise ValueError(f"got {spec!r}: the anchor has only {n_layers} layers")
    if kind == "first":
        return list(range(n))
    if kind == "last":
        return list(range(n_layers - n, n_layers))
    start = (n_layers - n) // 2
    return list(range(start, start + n))
