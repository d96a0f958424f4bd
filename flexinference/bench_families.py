"""The case families of ``flexinference bench``: how each one estimates, builds and attends.

Every family returns a :class:`Prepared`: the whole op, its parts, the exact keep tables (for the
reference check and the FLOP floor), the visited-block fraction and, when MInference's kernels are
importable, the peer call. Families:

* ``vertical_slash``: 1000 verticals + 6096 slashes per head in the regimes of
  :data:`~flexinference.bench_cases.REGIMES`; real estimation on q, k is timed, its indices replaced by the
  regime's (so the kernel sees the regime).
* ``layer_mix``: the same, banded, with the per-head budgets of MInference's Llama-3-8B-262K config for
  one layer (``L0``, ``L15``, ``L31``); all heads in one call.
* ``e2e``: one whole layer through the public pieces (``build_tables`` estimation on structured q/k, then
  ``attend_tables``), budgets of layer 0.
* ``block_topk`` (100 blocks of 64), ``a_shape`` (sink 128 + local 4096): ``build_tables`` estimation,
  then ``attend_tables``.
* ``dense``: the short-prompt fallback as a patched model runs it: the attention function transformers
  calls (:func:`~flexinference.hf_attention.flexinference_attention`) for a vertical-slash layer whose
  ``min_sparse_len`` is above the prompt length (SDPA, then transformers' ``(B, S, H, D)`` layout).

Every family attends through ``attend_tables`` with the run's :class:`~flexinference.attention.Impl`
(default ``AUTO``: what a user gets; its choice, e.g. ``triton`` or ``sdpa``, is in the row's notes).
``Impl.FLEX`` keeps the BlockMask experiments: block top-k in 64x64 tiles (``t64``, every cell one full
kernel block) and the H100 default 128x64 (``t128``, mostly partial); ``Impl.GATHERED`` runs
vertical-slash through gathered verticals.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from flexinference.bench_cases import (
    REGIMES,
    layer_budgets,
    regime_indices,
    structured_qkv,
    tables_from_indices,
)
from flexinference.compose import build_tables, table_length
from flexinference.estimate.vertical_slash import vertical_slash_indices
from flexinference.attention import Impl, attend_tables, auto_route
from flexinference.config import LayerPlan
from flexinference.gathered import visited_block_fraction
from flexinference.hf_attention import PLAN_ATTR, flexinference_attention
from flexinference.masks.block_mask import block_mask_from_tables
from flexinference.masks.tables import KeepTables
from flexinference.patterns import AShape, BlockTopK, Dense, VerticalSlash

__all__ = ["FAMILIES", "Context", "Family", "Prepared", "load_minference_ops"]

log = logging.getLogger(__name__)

REFERENCE_LEN = 131072  # budgets below are the issue's, stated for 128K
# BlockMask tilings of block top-k: "t64" makes every 64x64 cell one full kernel block (no mask_mod);
# "t128" uses the H100 default 128x64 tile, where a tile spans two cell rows and is mostly partial.
TOPK_TILES = {"t64": ((64, 64), {"BLOCK_M": 64, "BLOCK_N": 64}), "t128": ((128, 64), None)}


@dataclass(frozen=True)
class Context:
    """Run-wide settings shared by the families."""

    cfg: object
    device: torch.device
    dtype: torch.dtype
    scale: float
    config_path: Path | None
    peer_ops: dict | None
    impl: Impl = Impl.AUTO

    @property
    def check_rows(self) -> int:
        return self.cfg.check_rows

    @property
    def reps(self) -> int:
        return self.cfg.reps

    @property
    def warmup(self) -> int:
        return self.cfg.warmup


@dataclass(frozen=True)
class Prepared:
    """One prepared case: callables to time and what the check needs."""

    name: str
    whole: Callable[[], Tensor]
    parts: dict[str, Callable]
    check: Callable[[], tuple[Tensor, KeepTables]]
    tables: KeepTables
    visited: float
    peer: Callable[[], Tensor] | None = None
    notes: str = ""
    inputs: tuple[Tensor, Tensor, Tensor] | None = None
    route: str = ""


@dataclass(frozen=True)
class Family:
    """A case family: its variants for a config and its preparation function."""

    variants: Callable[[object], tuple[str, ...]]
    prepare: Callable[..., Prepared]

    def __call__(self, variant: str, seq_len: int, ctx: Context, q: Tensor, k: Tensor, v: Tensor) -> Prepared:
        return self.prepare(variant, seq_len, ctx, q, k, v)


def load_minference_ops() -> dict | None:
    """MInference's two kernel entry points, imported without running its package ``__init__`` (which
    pulls optional extensions); ``None`` when the package or its compiled extension is missing."""
    spec = importlib.util.find_spec("minference")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    try:
        if "minference" not in sys.modules:
            for name, path in (("minference", root), ("minference.ops", root / "ops")):
                pkg = types.ModuleType(name)
                pkg.__path__ = [str(path)]
                sys.modules[name] = pkg
        vs = importlib.import_module("minference.ops.pit_sparse_flash_attention_v2")
        bs = importlib.import_module("minference.ops.block_sparse_flash_attention")
    except Exception as exc:  # noqa: BLE001 -- a broken optional peer (import, CUDA build) must not stop the run
        log.warning("MInference kernels not usable (%s: %s); peer columns skipped", type(exc).__name__, exc)
        return None
    return {"vertical_slash": vs.vertical_slash_sparse_attention, "block_sparse": bs.block_sparse_attention}


def _budget(ctx: Context, value: int, seq_len: int, minimum: int) -> int:
    if not ctx.cfg.scale_budgets:
        return value
    return max(minimum, round(value * seq_len / REFERENCE_LEN))


def _repeat_kv(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    group = heads // k.shape[1]
    return k.repeat_interleave(group, 1).contiguous(), v.repeat_interleave(group, 1).contiguous()


def _route_notes(ctx: Context, q: Tensor, k: Tensor, tables: KeepTables, block_size=(128, 128)):
    """``(route, visited, computed)``: what runs (the AUTO choice spelled out), the fraction of causal
    kernel tiles it visits (1.0 for SDPA; the plain BlockMask's for flex) and the keep tables it computes
    exactly (heads AUTO routes to dense keep everything: the check compares against those)."""
    impl, computed = auto_route(q, k, tables, block_size) if ctx.impl is Impl.AUTO else (ctx.impl, tables)
    if impl is None:
        return "sdpa", 1.0, computed
    if impl is Impl.TRITON:
        from flexinference.kernels.from_tables import tile_grid

        return "triton", float(tile_grid(computed).stats()[0].mean()), computed
    gathered = impl is Impl.GATHERED
    frac = visited_block_fraction(computed, num_kv_heads=k.shape[1], block_size=block_size, gathered=gathered)
    return impl.value, float(frac.mean()), computed


def _attend(ctx: Context, q: Tensor, k: Tensor, v: Tensor, tables: KeepTables, **flex_options) -> Tensor:
    return attend_tables(q, k, v, tables, scale=ctx.scale, impl=ctx.impl, **flex_options)


def _vs_case(name, regime, vertical, slash, seq_len, ctx, q, k, v, peer_per_head=False):
    """Vertical-slash with the regime's indices (shared by two families): estimation is timed on the real
    q, k, then the regime's tables are built and attended."""
    heads = q.shape[1]
    cols, offs = regime_indices(regime, seq_len, vertical, slash, seed=ctx.cfg.seed)
    tables = tables_from_indices(cols, offs, seq_len)
    full = torch.full_like(vertical, 30)
    near = torch.full_like(vertical, 100)

    def estimate_fn():
        return vertical_slash_indices(
            q, k, vertical=vertical, slash=slash, first_columns=full, nearest_diagonals=near,
            max_vertical=int(vertical.max()), max_slash=int(slash.max()), last_q=64, scale=ctx.scale,
            table_len=table_length(seq_len))

    def build():
        return tables_from_indices(cols, offs, seq_len)

    def attention():
        return _attend(ctx, q, k, v, tables)

    def whole():
        estimate_fn()
        return _attend(ctx, q, k, v, build())

    peer = None
    if ctx.peer_ops is not None:
        kr, vr = _repeat_kv(k, v, heads)
        fn = ctx.peer_ops["vertical_slash"]
        if peer_per_head:  # MInference loops over heads when budgets differ
            idx = [(cols[h][cols[h] >= 0].view(1, 1, -1).int(), offs[h][offs[h] >= 0].view(1, 1, -1).int())
                   for h in range(heads)]

            def peer():
                return [fn(q[:, h : h + 1], kr[:, h : h + 1], vr[:, h : h + 1], *idx[h]) for h in range(heads)]
        else:
            vi, si = cols[None].int(), offs[None].int()

            def peer():
                return fn(q, kr, vr, vi, si)

    route, visited, computed = _route_notes(ctx, q, k, tables)
    return Prepared(name=name, whole=whole, parts={"estimate": estimate_fn, "mask": build, "attention": attention},
                    check=lambda: (whole(), computed), tables=tables, visited=visited, peer=peer,
                    notes=f"route={route}", route=route)


def _vertical_slash(variant, seq_len, ctx, q, k, v):
    heads = q.shape[1]
    vertical = torch.full((heads,), _budget(ctx, 1000, seq_len, 30), dtype=torch.long, device=q.device)
    slash = torch.full((heads,), _budget(ctx, 6096, seq_len, 100), dtype=torch.long, device=q.device)
    return _vs_case(f"vs_{variant}", variant, vertical, slash, seq_len, ctx, q, k, v)


def _layer_budget_tensors(ctx, layer, heads, seq_len, device):
    budgets = layer_budgets(ctx.config_path, layer)
    pairs = [budgets[h % len(budgets)] for h in range(heads)]
    vertical = torch.tensor([_budget(ctx, p[0], seq_len, 30) for p in pairs], dtype=torch.long, device=device)
    slash = torch.tensor([_budget(ctx, p[1], seq_len, 100) for p in pairs], dtype=torch.long, device=device)
    return vertical, slash


def _layer_mix(variant, seq_len, ctx, q, k, v):
    vertical, slash = _layer_budget_tensors(ctx, int(variant[1:]), q.shape[1], seq_len, q.device)
    return _vs_case(f"layer_{variant}", "banded", vertical, slash, seq_len, ctx, q, k, v, peer_per_head=True)


def _e2e(variant, seq_len, ctx, q, k, v):
    heads, kv_heads, dim = q.shape[1], k.shape[1], q.shape[3]
    q, k, v = structured_qkv(1, heads, kv_heads, seq_len, dim, dtype=ctx.dtype, device=ctx.device, seed=ctx.cfg.seed)
    vertical, slash = _layer_budget_tensors(ctx, 0, heads, seq_len, q.device)
    pats = [VerticalSlash(vertical=int(a), slash=int(b)) for a, b in zip(vertical.tolist(), slash.tolist())]
    tables = build_tables(q, k, pats, scale=ctx.scale)

    def whole():
        return _attend(ctx, q, k, v, build_tables(q, k, pats, scale=ctx.scale))

    def attention():
        return _attend(ctx, q, k, v, tables)

    route, visited, computed = _route_notes(ctx, q, k, tables)
    return Prepared(name="e2e_L0", whole=whole, check=lambda: (attention(), computed), tables=tables, visited=visited,
                    parts={"estimate": lambda: build_tables(q, k, pats, scale=ctx.scale), "attention": attention},
                    inputs=(q, k, v), notes=f"structured q/k, real estimation; route={route}", route=route)


def _plain(name, pats, seq_len, ctx, q, k, v, peer=None, block_size=(128, 128), kernel_options=None):
    """Patterns without per-case indices: ``build_tables`` estimation, then ``attend_tables``."""
    tables = build_tables(q, k, pats, scale=ctx.scale)
    options = {"block_size": block_size, "kernel_options": kernel_options}

    def attention():
        return _attend(ctx, q, k, v, tables, **options)

    def whole():
        return _attend(ctx, q, k, v, build_tables(q, k, pats, scale=ctx.scale), **options)

    parts = {"estimate": lambda: build_tables(q, k, pats, scale=ctx.scale), "attention": attention}
    if ctx.impl is Impl.FLEX:
        parts["mask"] = lambda: block_mask_from_tables(tables, *block_size)
    route, visited, computed = _route_notes(ctx, q, k, tables, block_size)
    return Prepared(name=name, whole=whole, check=lambda: (attention(), computed), tables=tables, visited=visited,
                    parts=parts, peer=peer, route=route,
                    notes=f"route={route} block_size={block_size} kernel_options={kernel_options}")


def _block_topk(variant, seq_len, ctx, q, k, v):
    topk = _budget(ctx, 100, seq_len, 2)
    block_size, options = TOPK_TILES[variant]
    options = options if q.is_cuda else None  # tile sizes are GPU kernel options (only flex reads them)
    peer = None
    if ctx.peer_ops is not None:
        kr, vr = _repeat_kv(k, v, q.shape[1])
        fn = ctx.peer_ops["block_sparse"]

        def peer():
            return fn(q, kr, vr, topk)

    return _plain(f"block_topk_{variant}", [BlockTopK(block=64, topk=topk)] * q.shape[1], seq_len, ctx, q, k, v,
                  peer=peer, block_size=block_size, kernel_options=options)


def _a_shape(variant, seq_len, ctx, q, k, v):
    local = _budget(ctx, 4096, seq_len, 128)
    return _plain("a_shape", [AShape(sink=128, local=local)] * q.shape[1], seq_len, ctx, q, k, v)


def _dense(variant, seq_len, ctx, q, k, v):
    module = torch.nn.Module()
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    # A small budget, so that a missed fallback (the sparse path) fails the reference check against dense.
    setattr(module, PLAN_ATTR, LayerPlan((VerticalSlash(30, 64),) * q.shape[1], min_sparse_len=seq_len + 1,
                                         impl=ctx.impl))
    tables = build_tables(q, k, [Dense()] * q.shape[1], scale=ctx.scale)

    def whole():
        return flexinference_attention(module, q, k, v, None, ctx.scale)[0]

    return Prepared(name="dense", whole=whole, parts={}, check=lambda: (whole().transpose(1, 2), tables),
                    tables=tables, visited=1.0, route="sdpa", notes="route=sdpa (patched layer, prompt below "
                    "min_sparse_len)")


FAMILIES: dict[str, Family] = {
    "vertical_slash": Family(lambda cfg: REGIMES, _vertical_slash),
    "layer_mix": Family(lambda cfg: tuple(f"L{i}" for i in cfg.layers), _layer_mix),
    "e2e": Family(lambda cfg: ("L0",), _e2e),
    "block_topk": Family(lambda cfg: ("t64", "t128") if cfg.device.startswith("cuda") and cfg.impl is Impl.FLEX
                         else ("t64",), _block_topk),
    "a_shape": Family(lambda cfg: ("128+4096",), _a_shape),
    "dense": Family(lambda cfg: ("fallback",), _dense),
}
