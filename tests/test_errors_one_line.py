"""Every user-facing error is one line, whatever user-supplied text it quotes (errors.py):
found by the request fuzz target (fuzz/targets.py `fuzz_request`): a memory_limit of
"a\\nb" came back as a two-line message."""

from __future__ import annotations

import pytest

from pyvirt.errors import ConfigError, ImageCorruptError, ImageError, one_line
from pyvirt.host.models import VmCreate, to_spec


def test_a_quoted_line_break_stays_escaped() -> None:
    with pytest.raises(ConfigError) as e:
        to_spec(VmCreate(name="x", memory_limit="a\nb"))
    assert str(e.value) == "memory_limit a\\nb: expected a size such as 256M or 1G"


@pytest.mark.parametrize("cls", [ConfigError, ImageError, ImageCorruptError])
def test_every_error_class_is_one_line(cls: type[Exception]) -> None:
    msg = str(cls("disk image /tmp/a\r\nb\x1b[2J\u2028 is bad"))
    assert "\n" not in msg and "\r" not in msg and "\x1b" not in msg and "\u2028" not in msg
    assert msg.startswith("disk image /tmp/a\\r\\nb\\x1b[2J")


def test_printable_text_is_left_alone() -> None:
    assert one_line("größe 1G: ok") == "größe 1G: ok"
