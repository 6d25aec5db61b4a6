"""Evaluation corpora: ``pydoc`` (Python's own documentation topics) is built as documented and its
protocol line names the Python version; the CLI evaluates it on a tiny model."""

from __future__ import annotations

import json
import platform

import pytest
from models_fixtures import tiny_llama_dir  # noqa: F401

from thawed.codecs.errors import ThawedError
from thawed.runtime.cli import main
from thawed.runtime.eval import describe_corpus, load_corpus


def test_pydoc_is_every_topic_in_sorted_key_order() -> None:
    from pydoc_data.topics import topics

    name, text = load_corpus("pydoc")
    assert name == "pydoc"
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(topics[k]) for k in keys) + 2 * (len(keys) - 1)
    assert text.index(topics[keys[1]]) < text.index(topics[keys[2]])
    assert platform.python_version() in describe_corpus("pydoc")


def test_unknown_corpus_names_the_choices() -> None:
    with pytest.raises(ThawedError, match="pydoc"):
        load_corpus("wikitext")


def test_cli_eval_pydoc_states_python_version(tiny_llama_dir, capsys) -> None:
    assert main(["eval", str(tiny_llama_dir), "--corpus", "pydoc", "--tokens", "150", "--ctx", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["corpus"] == "pydoc" and res["scored_tokens"] == 149
    assert f"Python {platform.python_version()}" in res["protocol"] and "window 64, stride 32" in res["protocol"]
