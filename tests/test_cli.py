"""The README's commands, run as a user runs them (a subprocess each)."""

from __future__ import annotations

import io
import json
import subprocess
import sys


def glimpse(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glimpse.cli", *args], capture_output=True, text=True, timeout=300, env=env
    )


def test_make_tiny_then_generate(tmp_path):
    made = glimpse("make-tiny", str(tmp_path / "tiny"), "--seed", "1")
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "tiny" / "config.json").is_file()
    out = glimpse("generate", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-tokens", "8", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert len(result["token_ids"]) == 8 and result["finish_reason"] == "length"


def test_builtin_tiny_generates_deterministically():
    """`glimpse generate tiny ...` (the README's first command) needs no download and is reproducible."""
    a = glimpse("generate", "tiny", "--prompt", "Describe the chart.", "--max-tokens", "12", "--json")
    b = glimpse("generate", "tiny", "--prompt", "Describe the chart.", "--max-tokens", "12", "--json")
    assert a.returncode == 0, a.stderr
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_bad_model_is_a_clear_error():
    out = glimpse("generate", "./no-such-dir", "--prompt", "x")
    assert out.returncode == 2
    assert "not a directory, a built-in model" in out.stderr


# ---------------------------------------------------------------------------------------- in-process


def all_parsers():
    """(name, parser) for `glimpse` and each of its commands."""
    import argparse

    from glimpse.cli import build_parser

    parser = build_parser()
    (subs,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [("glimpse", parser), *((f"glimpse {name}", p) for name, p in subs.choices.items())]


def test_every_flag_of_every_command_has_help():
    """`--help` explains every flag and argument of every command (generated ones included)."""
    import argparse

    missing = [
        f"{name}: {'/'.join(action.option_strings) or action.dest}"
        for name, parser in all_parsers()
        for action in parser._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert not missing, missing


def test_a_usage_error_is_one_line(capsys):
    """A bad flag: one `error` line naming it (not the dozens of lines of serve's usage), exit 2."""
    import pytest

    from glimpse.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["serve", "tiny", "--port", "99999"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == ["glimpse serve: error: argument --port: port must be > 0 and <= 65535, got 99999"], err


CONTROL = "red:\x1b[31m title:\x1b]0;pwned\x07 back:\r over:\u202eevil\u202c bell:\x07 nel:\x85 ok:\té\n"


def test_for_terminal_escapes_control_characters():
    from glimpse.cli import for_terminal

    shown = for_terminal(CONTROL)
    expected = "red:\\x1b[31m title:\\x1b]0;pwned\\x07 back:\\r over:\\u202eevil\\u202c bell:\\x07"
    assert shown == expected + " nel:\\x85 ok:\té\n"
    assert for_terminal("plain text, 漢字 🙂\n\tindented") == "plain text, 漢字 🙂\n\tindented"


class _Out:
    def __init__(self, text: str) -> None:
        self.text = text
        self.token_ids, self.finish_reason = [1], "stop"


class _Result:
    def __init__(self, text: str) -> None:
        self.outputs = [_Out(text)]
        self.prompt_token_ids, self.video_tokens, self.media = [1, 2], None, []


class _FakeLLM:
    """Answers every prompt with CONTROL (model text full of terminal control sequences)."""

    def generate(self, prompt, params):
        return [_Result(CONTROL)]

    def chat(self, messages, params):
        return [_Result(CONTROL)]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_cli(monkeypatch, argv: list[str], stdout: io.StringIO, stdin: str = "") -> str:
    from glimpse import cli

    monkeypatch.setattr(cli, "_llm", lambda args: _FakeLLM())
    monkeypatch.setattr("sys.stdout", stdout)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    assert cli.main(argv) == 0
    return stdout.getvalue()


def test_generate_escapes_model_text_on_a_terminal(monkeypatch):
    """[G8] what the model writes can't drive the terminal: escapes are shown, not sent."""
    shown = _run_cli(monkeypatch, ["generate", "tiny", "--prompt", "hi"], _Terminal())
    assert "\x1b" not in shown and "\r" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert "\\x1b[31m" in shown and "\\u202e" in shown


def test_generate_keeps_model_text_exact_in_a_pipe(monkeypatch):
    """Redirected to a file or a pipe, the text is exactly the model's (scripts read it as is)."""
    assert _run_cli(monkeypatch, ["generate", "tiny", "--prompt", "hi"], io.StringIO()) == CONTROL + "\n"
    out = _run_cli(monkeypatch, ["generate", "tiny", "--prompt", "hi", "--json"], _Terminal())
    assert "\x1b" not in out and json.loads(out)["text"] == CONTROL


def test_chat_escapes_model_text_on_a_terminal(monkeypatch):
    shown = _run_cli(monkeypatch, ["chat", "tiny"], _Terminal(), stdin="hello\n/quit\n")
    assert "assistant> red:\\x1b[31m" in shown
    assert "\x1b" not in shown and "\u202e" not in shown


def test_chat_template_replaces_the_checkpoints(tmp_path, capsys):
    """`--chat-template FILE` (or the Jinja text itself) renders the prompt in place of the model's; a
    path that is not there is a one-line error before the model loads."""
    from transformers import AutoTokenizer

    from glimpse import LLM, SamplingParams
    from glimpse.cli import build_parser, main
    from glimpse.model.loading import resolve_model_path

    template = "{% for m in messages %}<<{{ m['content'] }}>>{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path("tiny")))
    expected = tokenizer.encode("<<Describe the chart.>>", add_special_tokens=False)
    messages = [{"role": "user", "content": "Describe the chart."}]
    for given in (str(tmp_path / "t.jinja"), template):
        assert build_parser().parse_args(["generate", "tiny", "--prompt", "x", "--chat-template", given])
        out = LLM("tiny", chat_template=given, max_num_seqs=1).chat(messages, SamplingParams(max_tokens=1))
        assert out[0].prompt_token_ids == expected
    absent = str(tmp_path / "absent.jinja")
    assert main(["generate", "tiny", "--chat-template", absent, "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("glimpse: error: ") and absent in err and len(err.splitlines()) == 1, err
