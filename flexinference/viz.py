"""Pictures of patterns: the kept (query, key) pairs of one head, drawn with attention-gym.

``python -m flexinference.viz OUT_DIR`` writes one PNG per pattern at ``S = 1024`` (docs/patterns.md).
Dynamic patterns are estimated on synthetic queries and keys with planted structure (a few "retrieval"
key columns and a local band), so what they keep is what they would find in a real head.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from flexinference import patterns as P
from flexinference.compose import build_tables
from flexinference.masks.tables import keep_mask_mod

__all__ = ["DOC_PATTERNS", "planted_qk", "save_pattern_image"]

#: Budgets scaled to S = 1024 so each shape is visible (defaults target 128K tokens).
DOC_PATTERNS: dict[str, P.Pattern] = {
    "dense": P.Dense(),
    "a_shape": P.AShape(sink=64, local=128),
    "tri_shape": P.TriShape(sink=64, local=128, last=100),
    "vertical_slash": P.VerticalSlash(vertical=40, slash=60, last_q=64),
    "vertical_slash_static": P.VerticalSlashStatic(columns=(0, 1, 2, 3, 100, 400, 700), diagonals=(0, 1, 2, 50, 300)),
    "block_topk": P.BlockTopK(block=64, topk=4),
    "dilated": P.Dilated(sink=64, band=32, span=512, dilation=8),
    "strided": P.Strided(stride=128, local=64),
    "flexprefill": P.FlexPrefill(gamma=0.9, block=64, min_len=0),
    "xattention": P.XAttention(stride=8, threshold=0.9, block=64),
}


def planted_qk(seq_len: int, dim: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys ``(1, 1, S, D)`` whose attention has sink, retrieval-column and local structure."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 1, seq_len, dim, generator=g) * 0.3
    k = torch.randn(1, 1, seq_len, dim, generator=g) * 0.3
    anchor = torch.randn(dim, generator=g)
    q[..., :, :] += anchor
    for col in (0, 1, seq_len // 5, seq_len // 2, (3 * seq_len) // 4):
        k[..., col, :] += 2.5 * anchor
    # Local band: each key resembles the queries just after it.
    pos = torch.arange(seq_len, dtype=torch.float32)
    freqs = torch.randn(dim // 2, generator=g).abs() * 0.05
    rot = torch.cat([torch.cos(pos[:, None] * freqs), torch.sin(pos[:, None] * freqs)], -1)
    q[0, 0] += 1.5 * rot
    k[0, 0] += 1.5 * rot
    return q, k


def save_pattern_image(name: str, pattern: P.Pattern, out_dir: Path, seq_len: int = 1024) -> Path:
    """Draw ``pattern``'s kept pairs at ``seq_len`` with attn-gym's ``visualize_attention_scores``."""
    from attn_gym import visualize_attention_scores

    q, k = planted_qk(seq_len)
    tables = build_tables(q, k, [pattern], scale=q.shape[-1] ** -0.5)
    mask_mod = keep_mask_mod(tables)
    mask_mod.__name__ = name
    path = Path(out_dir) / name
    visualize_attention_scores(q, k, mask_mod=mask_mod, device="cpu", name=name, path=path)
    png = path.with_suffix(".png")
    from PIL import Image  # shipped with matplotlib

    with Image.open(png) as img:  # attn-gym saves at 300 dpi: shrink for the docs
        img.convert("RGB").resize((660, 594)).quantize(colors=64).save(png, optimize=True)
    return png


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/images")
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    for name, pattern in DOC_PATTERNS.items():
        print(save_pattern_image(name, pattern, out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
