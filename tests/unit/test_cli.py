import importlib

import pytest

from lmlab.cli import COMMANDS, main


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_resolves_and_has_help(name, capsys):
    module, func = COMMANDS[name][0].split(":")
    assert callable(getattr(importlib.import_module(module), func))
    try:
        code = main([name, "--help"])
    except SystemExit as exit_:  # argparse exits after printing help
        code = exit_.code
    assert code == 0
    assert "usage" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
