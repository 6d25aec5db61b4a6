"""``Codec.from_options``: string options typed by the encoder's ``__init__`` annotations."""

from __future__ import annotations

from typing import Optional

import pytest

from thawed.codecs import CodecError
from thawed.codecs.base import Codec


class _OptionsProbe(Codec, name="test-options-probe"):
    def __init__(self, rate: float | None = None, level: Optional[int] = None, flag: bool = False,
                 label: str = "x", count: int = 1) -> None:
        self.rate, self.level, self.flag, self.label, self.count = rate, level, flag, label, count


def test_typed_options_including_optional_unions() -> None:
    c = _OptionsProbe.from_options({"rate": "2.5", "level": "3", "flag": "true", "label": "abc", "count": "7"})
    assert (c.rate, c.level, c.flag, c.label, c.count) == (2.5, 3, True, "abc", 7)
    assert isinstance(c.rate, float) and isinstance(c.level, int)
    c = _OptionsProbe.from_options({"rate": "none", "level": "null"})
    assert c.rate is None and c.level is None


@pytest.mark.parametrize("key,raw", [("rate", "fast"), ("level", "2.5"), ("flag", "maybe"), ("count", "")])
def test_unreadable_option_names_codec_option_and_type(key: str, raw: str) -> None:
    with pytest.raises(CodecError, match=f"'test-options-probe' option '{key}'"):
        _OptionsProbe.from_options({key: raw})


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(CodecError, match="rate, level, flag, label, count"):
        _OptionsProbe.from_options({"speed": "1"})
