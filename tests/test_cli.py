"""The console script's one table of subcommands."""

from __future__ import annotations

import importlib

import pytest

from vlsurv.cli import COMMANDS, main


def test_every_subcommand_resolves_to_a_callable():
    for name, (target, _) in COMMANDS.items():
        module_name, func_name = target.split(":")
        assert callable(getattr(importlib.import_module(module_name), func_name)), name


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command_is_rejected(capsys):
    assert main(["fly"]) == 2
    assert "unknown command 'fly'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help_exits_cleanly(name):
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
