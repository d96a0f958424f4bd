import torch

import flexinference as fi
from flexinference.viz import DOC_PATTERNS, planted_qk, save_pattern_image


def test_pattern_image_is_written(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    png = save_pattern_image("a_shape", fi.AShape(sink=8, local=16), tmp_path, seq_len=128)
    assert png.exists() and png.stat().st_size > 1000


def test_doc_vertical_slash_finds_the_planted_columns():
    from flexinference.compose import build_tables

    q, k = planted_qk(1024)
    tables = build_tables(q, k, [DOC_PATTERNS["vertical_slash"]], scale=0.125)
    for col in (1024 // 5, 1024 // 2, 3 * 1024 // 4):
        assert tables.columns[0, 0, col]
    assert torch.is_tensor(tables.diagonals)
