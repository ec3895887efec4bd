"""A runner that dies on an exception before it could write exit.json: the daemon's reason
quotes the exception's last line from runner.log instead of "without reporting why"."""

from __future__ import annotations

from pathlib import Path

from pyvirt.host.supervisor import last_error_line

TRACEBACK = """2026-12-05 22:07:38,536 runner[31836]: VM job (id d1aa3a6c64e7): booting
Traceback (most recent call last):
  File "/src/pyvirt/host/runner.py", line 378, in enter_jail
PermissionError: [Errno 13] Permission denied: '/tmp/x/vms/d1/jail.json.tmp'
"""


def test_the_exceptions_last_line_is_the_reason(tmp_path: Path) -> None:
    log = tmp_path / "runner.log"
    log.write_text(TRACEBACK)
    assert last_error_line(log) == "PermissionError: [Errno 13] Permission denied: '/tmp/x/vms/d1/jail.json.tmp'"


def test_a_log_not_ending_in_an_exception_gives_nothing(tmp_path: Path) -> None:
    log = tmp_path / "runner.log"
    log.write_text("2026-12-05 runner[1]: VM job: booting\n")
    assert last_error_line(log) == ""
    assert last_error_line(tmp_path / "missing.log") == ""


def test_a_hostile_log_gives_one_short_line(tmp_path: Path) -> None:
    """The guest cannot write runner.log, but the VMM's exception text may quote guest or
    file data: the reason stays one line, bounded, and only the log's tail is read."""
    log = tmp_path / "runner.log"
    log.write_bytes(b"x" * (10 << 20) + b"\nValueError: " + b"\x1b[2J\xe2\x80\xa8" + b"A" * 5000 + b"\n")
    line = last_error_line(log)
    assert line.startswith("ValueError: ") and "\n" not in line and "\x1b" not in line
    assert "\u2028" not in line and len(line) <= 300
