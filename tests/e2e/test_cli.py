"""The `baton` console script on the default model, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

BATON = shutil.which("baton", path=str(Path(sys.executable).parent))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert BATON, "the baton console script is not installed in this environment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [BATON, *args], input=stdin, capture_output=True, text=True, timeout=300, env=env
    )


def test_generate_streams_a_completion() -> None:
    r = run("generate", "The capital of France is", "--max-tokens", "8", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_chat_answers_and_exits_on_eof() -> None:
    r = run(
        "chat",
        "--max-tokens",
        "24",
        "--threads",
        "2",
        stdin="What is the capital of France?\n/exit\n",
    )
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


def test_bad_arguments_give_a_clear_error() -> None:
    r = run("generate", "hi", "--temperature", "7")
    assert r.returncode == 2
    assert "temperature must be in [0, 2], got 7.0" in r.stderr
    r = run("generate", "hi", "--model", "/nonexistent/model.gguf")
    assert r.returncode == 2
    assert "/nonexistent/model.gguf" in r.stderr
