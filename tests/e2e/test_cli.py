"""The `baton` console script on the default model, as a user runs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from baton.cli import main

BATON = shutil.which("baton", path=str(Path(sys.executable).parent))


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert BATON, "the baton console script is not installed in this environment"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [BATON, *args], input=stdin, capture_output=True, text=True, timeout=300, env=env
    )


def test_generate_streams_a_completion() -> None:
    # over an FP8 KV cache: the chat test below runs the default one
    r = run(
        "generate",
        "The capital of France is",
        "--max-tokens",
        "8",
        "--threads",
        "2",
        "--kv-cache-dtype",
        "fp8",
    )
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


def test_thread_counts_outside_the_machine_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    limit = 4 * (os.cpu_count() or 1)
    # -1 first: before the check, torch raised on it, and 100000 crashed the process.
    for threads in ("-1", "0", "100000", "two"):
        with pytest.raises(SystemExit) as e:
            main(["generate", "hi", "--max-tokens", "1", "--threads", threads])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --threads: must be an integer in [1, {limit}]" in err, err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-model-len", "0"], r"max_model_len must be >= 1, got 0"),
        (
            ["--max-model-len", "999999"],
            r"max_model_len \(999999\) exceeds the model's context window \(8192\)",
        ),
        (["--model", "{cut}"], r"{cut} is truncated or corrupt \(.+\)"),
    ],
)
def test_engine_settings_a_model_refuses_exit_2_with_one_line(
    tmp_path: Path,
    default_gguf: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    cut = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as f:
        cut.write_bytes(f.read(2000))
    argv = ["generate", "hi", "--max-tokens", "1", *(f.format(cut=cut) for f in flags)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"baton: error: {message.format(cut=re.escape(str(cut)))}\n", err), err


@pytest.mark.parametrize(
    ("flags", "content", "problem"),
    [
        (["--config", "{path}"], None, r"cannot read {path}: No such file or directory"),
        (["--config", "{path}"], "folder", r"cannot read {path}: Is a directory"),
        (
            ["--config", "{path}"],
            "model: {max_model_len: 2048\n",
            r"{path} is not valid YAML \(line 2, column 1\): expected ',' or '}}', but got "
            r"'<stream end>'",
        ),
        (
            ["--config", "{path}"],
            "router: {http_port: 70000}\n",
            r"{path}: router\.http_port: Input should be less than or equal to 65535",
        ),
        (
            ["--config", "{path}"],
            "kvstore: {targets: []}\n",
            r"{path}: kvstore\.targets must name at least one KV store shard \(host:port\) in "
            r"disaggregated mode; colocated mode needs none",
        ),
        (
            ["--http-port", "70000"],
            None,
            r"router\.http_port: Input should be less than or equal to 65535",
        ),
        # Port 0 would bind somewhere, then wait 5 minutes for /health on port 0.
        (
            ["--http-port", "0"],
            None,
            r"router\.http_port: Input should be greater than or equal to 1",
        ),
        (["--policy", "{path}"], None, r"cannot read {path}: No such file or directory"),
        (
            ["--policy", "{path}"],
            "- a\n- b\n",
            r"{path}: expected a CapacityPolicy mapping, got a list",
        ),
    ],
)
def test_serve_settings_a_user_gets_wrong_exit_2_before_ray_starts(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    content: str | None,
    problem: str,
) -> None:
    path = tmp_path / "given.yaml"
    if content == "folder":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert main(["serve", *(f.format(path=path) for f in flags)]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"baton: error: {problem.format(path=re.escape(str(path)))}\n", err), err


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["serve", "--policy-interval", "0"], "must be a number of seconds > 0, got 0"),
        (["kvstore", "--log-level", "loud"], "argument --log-level: invalid choice: 'LOUD'"),
        (["kvstore", "--metrics-port", "99999"], "a port is 1-65535, got 99999"),
    ],
)
def test_flags_out_of_bounds_are_refused_before_anything_starts(
    capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """A policy interval of 0 scraped in a tight loop; the kvstore's two flags ended in a
    traceback (the metrics port once the shard had started)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert says in capsys.readouterr().err


def _chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *turns: str) -> str:
    lines = iter([*turns, "/exit"])
    monkeypatch.setattr("builtins.input", lambda _: next(lines))
    assert main(["chat", "--max-tokens", "16", "--threads", "1", "--temperature", "0"]) == 0
    return capsys.readouterr().out


def test_ctrl_c_in_chat_drops_the_reply_and_the_chat_goes_on(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C mid-reply ended the session with a traceback; now it drops that turn. The
    interrupted step had published the prompt's full blocks (the scheduler does, before
    the forward pass) without writing their K/V: asked again, the answer read them until
    the prefix cache was reset."""
    from engine.model_runner import ModelRunner

    question = "What is the capital of France? Answer in one short sentence, please."
    clean = _chat(monkeypatch, capsys, question)
    execute, calls = ModelRunner.execute, [0]

    def interrupted_once(runner: ModelRunner, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 1:
            raise KeyboardInterrupt  # Ctrl-C lands in the prompt's forward pass
        return execute(runner, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "execute", interrupted_once)
    out = _chat(monkeypatch, capsys, question, question)
    assert out.count("(interrupted)") == 1
    assert out.split("(interrupted)")[1].strip() == clean.split("\n", 1)[1].strip()


def test_serve_refuses_a_missing_model_before_ray_starts(tmp_path: Path) -> None:
    from baton.cli import _parser
    from baton.serve import load_config

    args = _parser().parse_args(["serve", "--model", str(tmp_path / "absent.gguf")])
    with pytest.raises(ValueError, match=r"absent\.gguf' does not exist"):
        load_config(args)
