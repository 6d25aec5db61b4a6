"""Server units: stop strings held back until decided (and split across tokens), UTF-8 tails,
settings from THAWED_* (flags win over the environment), the serve CLI on top of the runtime's."""

from __future__ import annotations

import pytest

from thawed.server.detok import TextAssembler


class CharTokenizer:
    """One token per character (ids = code points); 0xFFFD stands for an incomplete byte run."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if not (skip_special_tokens and i == 0))


def feed(asm: TextAssembler, text: str) -> list[str]:
    out = []
    for ch in text:
        _, delta = asm.push(ord(ch))
        out.append(delta)
        if asm.stopped:
            break
    return out


def test_stop_string_split_across_tokens_is_held_back_then_cut():
    asm = TextAssembler(CharTokenizer(), ["STOP"])
    deltas = feed(asm, "abcSTxySTOPzz")
    assert "".join(deltas) == "abcSTxy"
    assert deltas[3:5] == ["", ""], "'S', 'T' could start STOP: held back"
    assert deltas[5] == "STx"  # released once 'x' shows it is not STOP
    assert asm.stopped and asm.output == "abcSTxy" and asm.flush() == ""


def test_include_stop_keeps_it_and_earliest_stop_wins():
    asm = TextAssembler(CharTokenizer(), ["cd", "bcd"], include_stop=True)
    assert "".join(feed(asm, "abcdef")) == "abcd" and asm.output == "abcd"
    asm = TextAssembler(CharTokenizer(), ["cd", "bcd"])
    assert "".join(feed(asm, "abcdef")) == "a"


def test_held_back_prefix_is_flushed_at_the_end():
    asm = TextAssembler(CharTokenizer(), ["STOP"])
    deltas = feed(asm, "abST")
    assert "".join(deltas) == "ab" and asm.flush() == "ST" and asm.output == "abST"


def test_incomplete_utf8_waits_for_the_next_token():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    asm = TextAssembler(Bytes(), [])
    e_acute = "é".encode()
    assert asm.push(ord("a")) == ("a", "a")
    assert asm.push(e_acute[0]) == ("", "")
    assert asm.push(e_acute[1]) == ("é", "é")
    assert asm.output == "aé"


def test_special_tokens_are_not_text():
    asm = TextAssembler(CharTokenizer(), [])
    assert asm.push(ord("a"))[1] == "a" and asm.push(0) == ("", "")


def test_settings_from_environment_and_flags_win(monkeypatch):
    from thawed.server.cli import build_parser, settings_from_args

    monkeypatch.setenv("THAWED_CHECKPOINT", "/env/ckpt")
    monkeypatch.setenv("THAWED_PORT", "9001")
    monkeypatch.setenv("THAWED_MAX_QUEUE", "3")
    monkeypatch.setenv("THAWED_API_KEY", "")  # empty = no key (compose passes empty defaults)
    monkeypatch.setenv("THAWED_PRELOAD", "true")
    args = build_parser().parse_args(["serve", "--port", "9002", "--cache-budget", "25%", "--no-batching"])
    s = settings_from_args(args)
    assert s.checkpoint == "/env/ckpt" and s.port == 9002 and s.max_queue == 3 and s.api_key is None
    assert s.preload is True and s.cache_budget == "25%" and s.batching is False
    s = settings_from_args(build_parser().parse_args(["serve", "/cli/ckpt", "--served-model-name", "m"]))
    assert s.checkpoint == "/cli/ckpt" and s.model_name == "m" and s.batching is True


def test_every_serve_flag_is_a_setting():
    from thawed.server import Settings
    from thawed.server.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    serve = sub.choices["serve"]
    dests = {a.dest for a in serve._actions if a.dest not in ("help", "ckpt")}
    assert dests <= set(Settings.model_fields)
    for flag in ("--host", "--port", "--device", "--cache-budget", "--max-queue", "--max-model-len", "--api-key",
                 "--served-model-name", "--preload"):
        assert flag in serve._option_string_actions
    assert {"compress", "inspect", "generate", "eval", "serve"} <= set(sub.choices)  # runtime's + serve


def test_bad_setting_is_a_clear_error(monkeypatch, capsys):
    from thawed.server.cli import main

    monkeypatch.setenv("THAWED_MAX_QUEUE", "-1")
    assert main(["serve", "/nowhere"]) == 2
    err = capsys.readouterr().err
    assert "max_queue" in err and "THAWED_MAX_QUEUE" in err
    monkeypatch.delenv("THAWED_MAX_QUEUE")
    assert main(["serve", "/nowhere/ckpt"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_runtime_commands_still_work_through_the_server_cli(capsys):
    from thawed.server.cli import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "serve" in capsys.readouterr().out
