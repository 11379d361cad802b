"""The `resnetlab` command's --help: a line of help on every flag of every command, and the training commands'
flags in sections."""

from __future__ import annotations

import argparse

import pytest

from resnetlab.cli import build_parser

SECTIONS = ["data", "model and weights", "optimizer and schedule", "compute", "logging and checkpoints"]


def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every command's parser by its name ("train", "detect train", ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(commands(sub, f"{prefix}{name} "))
    return found


def test_every_flag_and_argument_of_every_command_has_help():
    every = commands(build_parser())
    assert {"train", "evaluate", "predict", "export", "detect train", "detect evaluate"} <= every.keys()
    for name, parser in every.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("command", ["train", "detect train"])
def test_a_training_commands_flags_are_in_sections(command):
    parser = commands(build_parser())[command]
    groups = {group.title: [action.option_strings[0] for action in group._group_actions]
              for group in parser._action_groups}
    assert [title for title in groups if title in SECTIONS] == SECTIONS
    assert groups["options"] == ["-h"]  # no flag left outside a section
    assert "--data" in groups["data"] and "--model" in groups["model and weights"]
    assert {"--lr", "--seed"} <= set(groups["optimizer and schedule"])
    assert "--device" in groups["compute"] and {"--out", "--resume", "--log-every"} <= set(
        groups["logging and checkpoints"])
    help_text = parser.format_help()
    assert [help_text.index(f"\n{title}:\n") for title in SECTIONS] == sorted(
        help_text.index(f"\n{title}:\n") for title in SECTIONS)
