"""The public surface is exactly what __all__ says (attention-gym's test_namespaces habit)."""

import flexinference


def test_public_names_resolve():
    for name in flexinference.__all__:
        assert hasattr(flexinference, name), name


def test_masks_and_compat_are_subpackages():
    import flexinference.compat
    import flexinference.masks
    import flexinference.masks.block_mask

    assert flexinference.masks.__name__ == "flexinference.masks"
    assert flexinference.compat.__name__ == "flexinference.compat"


def test_cli_info_runs(capsys):
    from flexinference.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "vertical_slash" in out and "torch" in out
