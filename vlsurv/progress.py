"""Progress bars that redraw in place on a terminal and write a sparse line log anywhere else.

tqdm redraws its bar with ``\\r`` several times a second; in a log file (``vlsurv demo > log 2>&1``) every
redraw stays. ``progress_bar`` keeps tqdm's bar on a terminal; on any other stream it writes one plain line
at most every ``LOG_INTERVAL_S`` seconds, plus the last state. ``quiet_library_bars`` turns off the bars of
transformers and huggingface_hub ("Loading weights", "Writing model shards") where stderr is not a terminal.
"""

from __future__ import annotations

import os
import sys
from typing import IO

from tqdm import std
from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0
HF_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"


def is_terminal(stream: IO[str]) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _LineStream:
    """A file for tqdm that turns each ``\\r``-redraw into one ``\\n``-ended line on ``stream``."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(
    *,
    total: int,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: IO[str] | None = None,
) -> tqdm:
    """A tqdm bar over ``total`` items on ``stream`` (default stderr); see the module docstring.

    ``enabled=False`` gives a bar that writes nothing (tqdm's ``disable``). Pass ``refresh=False`` to
    ``set_postfix``: a refresh writes a line whatever the interval.
    """
    stream = sys.stderr if stream is None else stream
    common = {"total": total, "desc": desc, "unit": unit, "initial": initial, "disable": not enabled}
    if is_terminal(stream):
        return tqdm(file=stream, **common)
    return std.tqdm(file=_LineStream(stream), mininterval=LOG_INTERVAL_S, ascii=True, ncols=80, **common)


def quiet_library_bars(stream: IO[str] | None = None) -> None:
    """Turn off transformers' and huggingface_hub's own progress bars when ``stream`` (default stderr) is not
    a
    terminal: sets ``HF_HUB_DISABLE_PROGRESS_BARS`` unless the user set it (both libraries read it when
    imported, so call this before they are), and switches transformers' bars off if it is already imported."""
    if is_terminal(sys.stderr if stream is None else stream) or HF_BARS_ENV in os.environ:
        return
    os.environ[HF_BARS_ENV] = "1"
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
