"""The one base of every error that vlsurv and qa_extraction raise for bad input.

``InputError`` is a ``ValueError`` whose message names the file, row or field and says what was expected.
The CLI catches it and prints ``vlsurv <command>: error: <message>`` (exit 2) instead of a traceback.
This module imports nothing from vlsurv, so leaves such as ``losses`` and ``metrics`` may import it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input (a file, row, field, option or value); the message says what was expected."""


class CheckpointError(InputError):
    """A checkpoint (encoder weights, or a training state to resume) that is missing, incomplete or does not
    fit."""


class ModelLoadError(InputError):
    """A model directory, decoder directory or weight file that cannot be loaded as expected."""
