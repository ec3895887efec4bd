"""Progress reporting for image builds: a rich display on a terminal, plain lines otherwise.

Builders talk to a `Progress` object and never know which kind it is:

- `step(message)`: a new phase begins ("compiling the kernel");
- `update(label, done, total, unit)`: how far a measurable task is (bytes
  downloaded, files compiled); `total` may be None when unknown;
- `note(message)`: a finished result worth one line ("kernel built in 3m05s").

`Progress` itself says nothing; `PlainProgress` writes one line per phase
and note to a stream (for logs, pipes, CI); `RichProgress` draws live bars
with the `rich` library.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.progress import TaskID


class Progress:
    """Silent progress: the base and the do-nothing reporter."""

    def step(self, message: str) -> None:
        pass

    def update(self, label: str, done: int, total: int | None = None, unit: str = "bytes") -> None:
        pass

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class PlainProgress(Progress):
    """One line per phase and per note, prefixed `pyvirt: `; bars are not drawn."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr

    def step(self, message: str) -> None:
        self.stream.write(f"pyvirt: {message}...\n")
        self.stream.flush()

    def note(self, message: str) -> None:
        self.stream.write(f"pyvirt: {message}\n")
        self.stream.flush()


class RichProgress(Progress):
    """Live bars on a terminal (rich): one per download or compile task, plus phase lines."""

    def __init__(self, stream: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars

        self._console = Console(file=stream if stream is not None else sys.stderr)
        self._bars = Bars(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.fields[amount]}"), TimeElapsedColumn(),
                          console=self._console, transient=True)
        self._tasks: dict[str, TaskID] = {}
        self._bars.start()

    def step(self, message: str) -> None:
        self._console.print(f"[bold]pyvirt:[/bold] {message}...", highlight=False)

    def note(self, message: str) -> None:
        self._console.print(f"[bold]pyvirt:[/bold] {message}", highlight=False)

    def update(self, label: str, done: int, total: int | None = None, unit: str = "bytes") -> None:
        amount = _amount(done, total, unit)
        task = self._tasks.get(label)
        if task is None:
            task = self._tasks[label] = self._bars.add_task(label, total=total, completed=done, amount=amount)
        else:
            self._bars.update(task, completed=done, total=total, amount=amount)
        if total is not None and done >= total:         # finished: the bar goes away
            self._bars.remove_task(task)
            del self._tasks[label]

    def close(self) -> None:
        self._bars.stop()


def _amount(done: int, total: int | None, unit: str) -> str:
    if unit == "bytes":
        mib = 1 << 20
        return f"{done / mib:.1f}/{total / mib:.1f} MiB" if total else f"{done / mib:.1f} MiB"
    return f"{done}/{total} {unit}" if total else f"{done} {unit}"


def make_progress(enabled: bool = True, stream: TextIO | None = None) -> Progress:
    """A rich display when `enabled` and the stream is a terminal, plain lines otherwise."""
    out = stream if stream is not None else sys.stderr
    if enabled and out.isatty():
        return RichProgress(out)
    return PlainProgress(out)
