"""Every option of every `replicator` subcommand says what it does in --help: walked through the real
parser, and spot-checked in the installed command's output."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from replicator.cli import build_parser


def walk(parser: argparse.ArgumentParser, path=("replicator",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def test_every_option_and_argument_has_help():
    missing = []
    commands = 0
    for path, parser in walk(build_parser()):
        commands += 1
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not (action.help or "").strip() or action.help == argparse.SUPPRESS:
                missing.append(f"{' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert commands > 40
    assert missing == [], "no help text:\n" + "\n".join(missing)


def test_installed_help_shows_them():
    exe = os.path.join(os.path.dirname(sys.executable), "replicator")
    out = subprocess.run([exe, "replicate", "--help"], capture_output=True, text=True, check=True).stdout
    options = out.split("options:", 1)[1]
    for opt in ("--cert CERT", "--key KEY", "--ca CA", "--kerberos", "--json"):
        text = options.split(opt, 1)[1].split("\n  -", 1)[0]       # up to the next option
        assert len(text.split()) >= 3, f"{opt}: {text!r}"
