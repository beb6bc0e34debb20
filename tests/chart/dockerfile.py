"""Reads the repository's Dockerfile: its instructions, continuation lines joined."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

DOCKERFILE = Path(__file__).parents[2] / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


@cache
def instructions(path: Path = DOCKERFILE) -> tuple[Instruction, ...]:
    logical = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in logical.splitlines()]
    return tuple(
        Instruction(keyword.upper(), value.strip())
        for keyword, _, value in (line.partition(" ") for line in lines)
        if keyword and not keyword.startswith("#")
    )


def build_args() -> dict[str, str]:
    """ARG defaults, by name."""
    pairs = (i.value.partition("=") for i in instructions() if i.keyword == "ARG")
    return {name: default for name, _, default in pairs}


def entrypoint() -> list[str]:
    """The last ENTRYPOINT, which must be in exec (JSON) form."""
    (*_, last) = (i.value for i in instructions() if i.keyword == "ENTRYPOINT")
    argv: list[str] = json.loads(last)
    return argv
