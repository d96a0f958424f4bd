"""Sparse prefill patterns as data.

Each pattern is a frozen dataclass that says *what* a head keeps; it holds no tensors and does no work.
Static patterns (``Dense``, ``AShape``, ``TriShape``, ``Dilated``, ``Strided``, ``VerticalSlashStatic``)
fully determine the kept (query, key) pairs from the sequence length. Dynamic patterns
(``VerticalSlash``, ``BlockTopK``, ``FlexPrefill``, ``XAttention``) carry budgets; their indices are
estimated online from the real queries and keys (:mod:`flexinference.estimate`).

Every pattern is causal: a query never sees a later key, and the main diagonal (a query seeing its own
key) is always kept, so no query row is ever empty.

Conventions: a *diagonal offset* ``o`` keeps key ``j = i - o`` for query ``i`` (``0`` is the main
diagonal); a *column* (vertical) ``c`` keeps key ``c`` for every query ``i >= c``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "Pattern",
    "Dense",
    "AShape",
    "TriShape",
    "VerticalSlash",
    "VerticalSlashStatic",
    "BlockTopK",
    "Dilated",
    "Strided",
    "FlexPrefill",
    "XAttention",
    "PATTERN_TYPES",
    "pattern_from_dict",
    "pattern_to_dict",
]


def _check_int(obj: Any, name: str, minimum: int = 0) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{type(obj).__name__}.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{type(obj).__name__}.{name} must be >= {minimum}, got {value}")


def _check_fraction(obj: Any, name: str, low_open: bool = True) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{type(obj).__name__}.{name} must be a float, got {type(value).__name__}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise ValueError(f"{type(obj).__name__}.{name} must be in (0, 1], got {value}")


@dataclass(frozen=True, slots=True)
class Pattern:
    """Base class of all patterns. ``name`` is the key used in JSON configs."""

    name: ClassVar[str] = "pattern"
    dynamic: ClassVar[bool] = False


@dataclass(frozen=True, slots=True)
class Dense(Pattern):
    """Plain causal attention: every key at or before the query."""

    name: ClassVar[str] = "dense"


@dataclass(frozen=True, slots=True)
class AShape(Pattern):
    """StreamingLLM's attention-sink shape (Xiao et al., 2023, arXiv:2309.17453).

    Keeps the first ``sink`` keys and the ``local`` keys nearest each query (distance ``0 .. local-1``,
    the diagonal included). Defaults follow MInference's A-shape (128 + 3968).
    """

    name: ClassVar[str] = "a_shape"
    sink: int = 128
    local: int = 3968

    def __post_init__(self) -> None:
        _check_int(self, "sink")
        _check_int(self, "local", minimum=1)


@dataclass(frozen=True, slots=True)
class TriShape(Pattern):
    """A-shape for every query but the last ``last``, which attend densely (SCBench, Li et al., 2024,
    arXiv:2412.10319). Defaults: sink 128, local 3968, last 100."""

    name: ClassVar[str] = "tri_shape"
    sink: int = 128
    local: int = 3968
    last: int = 100

    def __post_init__(self) -> None:
        _check_int(self, "sink")
        _check_int(self, "local", minimum=1)
        _check_int(self, "last")


@dataclass(frozen=True, slots=True)
class VerticalSlash(Pattern):
    """MInference's vertical-slash pattern (Jiang et al., 2024, arXiv:2407.02490).

    The last ``last_q`` queries score all keys; the ``vertical`` columns and ``slash`` diagonals with the
    largest attention mass are kept. The first 30 columns and the 100 diagonals nearest the main one are
    always kept (as MInference does). Budgets are clamped to the sequence length at run time.
    """

    name: ClassVar[str] = "vertical_slash"
    dynamic: ClassVar[bool] = True
    vertical: int = 1000
    slash: int = 6096
    last_q: int = 64
    keep_first_columns: int = 30
    keep_nearest_diagonals: int = 100

    def __post_init__(self) -> None:
        for field in ("vertical", "slash", "keep_first_columns", "keep_nearest_diagonals"):
            _check_int(self, field)
        _check_int(self, "last_q", minimum=1)
        if self.slash < 1:
            raise ValueError("VerticalSlash.slash must be >= 1 (the main diagonal is always kept)")


@dataclass(frozen=True, slots=True)
class VerticalSlashStatic(Pattern):
    """MInference "w/ static": fixed key columns and diagonal offsets for every input.

    ``columns`` are key positions, ``diagonals`` offsets ``o >= 0`` (key ``i - o`` for query ``i``).
    Indices past the sequence length are ignored; the main diagonal is always kept.
    """

    name: ClassVar[str] = "vertical_slash_static"
    columns: tuple[int, ...] = (0,)
    diagonals: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        for field in ("columns", "diagonals"):
            value = getattr(self, field)
            if isinstance(value, list):
                object.__setattr__(self, field, tuple(value))
                value = getattr(self, field)
            if not isinstance(value, tuple) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in value
            ):
                raise TypeError(f"VerticalSlashStatic.{field} must be a tuple of ints")
            if any(x < 0 for x in value):
                raise ValueError(f"VerticalSlashStatic.{field} must hold non-negative indices")


@dataclass(frozen=True, slots=True)
class BlockTopK(Pattern):
    """Block-sparse top-k (MInference's block-sparse head, Jiang et al., 2024).

    Queries and keys are mean-pooled over ``block``-token blocks; each query block keeps the ``topk`` key
    blocks with the largest pooled score (block-causal; its own diagonal block is always kept).
    """

    name: ClassVar[str] = "block_topk"
    dynamic: ClassVar[bool] = True
    block: int = 64
    topk: int = 100

    def __post_init__(self) -> None:
        _check_int(self, "block", minimum=1)
        _check_int(self, "topk", minimum=1)


@dataclass(frozen=True, slots=True)
class Dilated(Pattern):
    """Dilated diagonals plus leading columns (MInference's ``dilated1``/``dilated2``).

    Keeps the first ``sink`` keys, every diagonal ``o < band``, and every ``dilation``-th diagonal with
    ``band <= o < span`` (counted from ``band``). MInference's own arithmetic drops the main diagonal in
    ``dilated1``; the main diagonal is always kept here.
    """

    name: ClassVar[str] = "dilated"
    sink: int = 1024
    band: int = 0
    span: int = 8192
    dilation: int = 2

    def __post_init__(self) -> None:
        _check_int(self, "sink")
        _check_int(self, "band")
        _check_int(self, "span")
        _check_int(self, "dilation", minimum=1)

    @classmethod
    def dilated1(cls) -> "Dilated":
        """First 1024 keys plus every other diagonal among the nearest 8192."""
        return cls(sink=1024, band=0, span=8192, dilation=2)

    @classmethod
    def dilated2(cls) -> "Dilated":
        """First 1024 keys, the 2048 nearest diagonals, then every other diagonal up to 6143."""
        return cls(sink=1024, band=2048, span=6144, dilation=2)


@dataclass(frozen=True, slots=True)
class Strided(Pattern):
    """Strided sparse attention (Child et al., 2019, arXiv:1904.10509, "strided" pattern).

    Keeps keys whose distance to the query is a multiple of ``stride`` (``(i - j) % stride == 0``), the
    ``local`` nearest keys, and the first ``sink`` keys.
    """

    name: ClassVar[str] = "strided"
    stride: int = 64
    local: int = 512
    sink: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "stride", minimum=1)
        _check_int(self, "local", minimum=1)
        _check_int(self, "sink")


@dataclass(frozen=True, slots=True)
class FlexPrefill(Pattern):
    """FlexPrefill (Lai et al., 2025, arXiv:2502.20766): per-head choice between a query-aware block
    pattern and a vertical-slash block pattern, each sized to cover ``gamma`` of the estimated attention
    mass; a head is query-aware when sqrt(JS divergence) between its pooled estimates is below ``tau``.
    Sequences shorter than ``min_len`` run dense."""

    name: ClassVar[str] = "flexprefill"
    dynamic: ClassVar[bool] = True
    gamma: float = 0.9
    tau: float = 0.1
    block: int = 128
    last_q: int = 128
    min_budget: int = 1
    min_len: int = 256

    def __post_init__(self) -> None:
        _check_fraction(self, "gamma")
        _check_fraction(self, "tau", low_open=False)
        _check_int(self, "block", minimum=1)
        _check_int(self, "last_q", minimum=1)
        _check_int(self, "min_budget", minimum=1)
        _check_int(self, "min_len")


@dataclass(frozen=True, slots=True)
class XAttention(Pattern):
    """XAttention (Xu et al., 2025, arXiv:2503.16428): antidiagonal scoring of ``stride x stride``
    sub-blocks summed into ``block x block`` blocks; per query-block row the first and diagonal blocks
    plus the largest blocks until ``threshold`` of the row's estimated mass is covered."""

    name: ClassVar[str] = "xattention"
    dynamic: ClassVar[bool] = True
    stride: int = 8
    threshold: float = 0.9
    block: int = 128

    def __post_init__(self) -> None:
        _check_int(self, "stride", minimum=1)
        _check_fraction(self, "threshold")
        _check_int(self, "block", minimum=1)
        if self.block % self.stride:
            raise ValueError(
                f"XAttention.block ({self.block}) must be a multiple of XAttention.stride ({self.stride})"
            )


PATTERN_TYPES: dict[str, type[Pattern]] = {
    cls.name: cls
    for cls in (
        Dense,
        AShape,
        TriShape,
        VerticalSlash,
        VerticalSlashStatic,
        BlockTopK,
        Dilated,
        Strided,
        FlexPrefill,
        XAttention,
    )
}


def pattern_to_dict(pattern: Pattern) -> dict[str, Any]:
    """``{"pattern": name, **fields}``, JSON-serialisable."""
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
    out: dict[str, Any] = {"pattern": pattern.name}
    for f in dataclasses.fields(pattern):
        value = getattr(pattern, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def pattern_from_dict(data: dict[str, Any]) -> Pattern:
    """Inverse of :func:`pattern_to_dict`; unknown names or fields raise ``ValueError``."""
    if not isinstance(data, dict) or "pattern" not in data:
        raise ValueError(f"pattern entry must be a dict with a 'pattern' key, got {data!r}")
    name = data["pattern"]
    if name not in PATTERN_TYPES:
        raise ValueError(f"unknown pattern {name!r}; valid: {sorted(PATTERN_TYPES)}")
    cls = PATTERN_TYPES[name]
    kwargs = {k: v for k, v in data.items() if k != "pattern"}
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = set(kwargs) - valid
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} for pattern {name!r}; valid: {sorted(valid)}")
    return cls(**kwargs)
