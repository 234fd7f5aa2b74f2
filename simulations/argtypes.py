"""Argument types of the `fedlearn` commands: a value argparse refuses ends as a usage error
(exit 2) naming the option, before the command does any work."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from pathlib import Path

from fedlearn import paths
from fedlearn.errors import PathError


def file_stem(name: str) -> str:
    """A key name is a file name inside --out: no path, no hidden file, nothing a shell mangles."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise argparse.ArgumentTypeError(
            f"{name!r} is not a file name stem: use letters, digits, '.', '_' and '-', starting with a letter "
            "or digit (the files are written inside --out)")
    return name


def _checked(check: Callable[[str], Path], name: str) -> Callable[[str], Path]:
    def parse(value: str) -> Path:
        try:
            return check(value)
        except PathError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("--out ")) from None
    parse.__name__ = name  # argparse names the type in its messages
    return parse


out_directory = _checked(paths.writable_directory, "directory")
new_file = _checked(paths.new_file, "new file")


def int_between(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{number} is out of range: give {low} to {high}{unit}")
        return number
    parse.__name__ = "number"
    return parse


def hex_prefix(value: str) -> str:
    """A SHA-256 digest or a prefix of it of 16+ hex digits (what `audit verify` prints)."""
    if not re.fullmatch(r"[0-9a-fA-F]{16,64}", value):
        raise argparse.ArgumentTypeError(f"{value!r} is not 16 to 64 hex digits of a SHA-256 digest")
    return value.lower()
