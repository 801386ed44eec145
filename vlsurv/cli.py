"""The ``vlsurv`` console script: one table maps each subcommand to its ``main(argv)``.

Modules are imported only when their subcommand runs, so ``vlsurv --help`` stays fast.
Each target is ``"module:function"`` where ``function(argv: list[str]) -> int``.
Bad input (any ``vlsurv.errors.InputError``, or a path error naming its file) ends as one line
``vlsurv <command>: error: <message>`` with status 2; ``vlsurv --debug <command>`` or ``VLSURV_DEBUG=1``
shows the traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

from vlsurv.errors import InputError

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vlsurv.data.synthetic:main", "write the synthetic CT cohort (NIfTI + manifest)"),
    "ctrate": ("vlsurv.data.ctrate:main", "raw CT-RATE volumes + CSVs -> HU NIfTI files and a manifest"),
    "inspect": ("vlsurv.data.inspect_v2:main", "an INSPECT v2 folder -> the cohort manifest"),
    "encode": ("vlsurv.encoders.cache:main", "encode every scan once into the feature cache"),
    "build-tiny": ("vlsurv.model.tiny:main", "build a tiny Llama decoder + tokenizer directory"),
    "train": ("vlsurv.train:main", "train stage 1 or stage 2 in one process (same code as accelerate)"),
    "predict": ("vlsurv.predict:main", "six answers and a risk per scan"),
    "evaluate": ("vlsurv.evaluate:main", "C-index, td-AUC, calibration, KM, BERTScore, report.html"),
    "demo": ("vlsurv.demo:main", "the whole pipeline on the synthetic cohort"),
    "horizon": ("vlsurv.horizon.cli:main", "fine-tune a 3D CNN for death within 1/3/5 years; AUROC table"),
    "baselines": ("vlsurv.baselines.run:main", "CoxPH, DeepSurv, DeepHit on text, image, both (Table 2)"),
    "table": ("vlsurv.baselines.table:main", "the Table-2 comparison of baseline and VLM runs"),
    "tte-evaluate": (
        "vlsurv.tte.evaluate_cli:main",
        "per-task C-index, AUROC and calibration of a tte_pretrain run on a split",
    ),
}


DEBUG_FLAG, DEBUG_ENV = "--debug", "VLSURV_DEBUG"
PATH_ERRORS: dict[type[OSError], str] = {
    FileNotFoundError: "expected an existing file or folder",
    FileExistsError: "expected a folder (or nothing), found a file",
    NotADirectoryError: "a part of the path is a file; expected a folder",
    IsADirectoryError: "expected a file, found a folder",
    PermissionError: "expected a path this user may read and write",
}


def usage(prog: str, commands: dict[str, tuple[str, str]]) -> str:
    """The command list of a ``prog [--debug] <command> [options]`` tool."""
    width = max(map(len, commands))
    lines = [f"usage: {prog} [{DEBUG_FLAG}] <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in commands.items()]
    lines += [
        "",
        f"`{prog} <command> --help` lists a command's options.",
        f"An error is one line; `{prog} {DEBUG_FLAG} <command> ...` (or {DEBUG_ENV}=1) shows its traceback.",
    ]
    return "\n".join(lines)


def error_message(err: BaseException) -> str | None:
    """The one-line message of a bad-input error, or None for an unexpected one (keeps its traceback).

    Bad input is an ``InputError`` or a path error (``PATH_ERRORS``) that names its file.
    """
    if isinstance(err, InputError):
        return str(err)
    expected = next((text for kind, text in PATH_ERRORS.items() if isinstance(err, kind)), None)
    if expected is not None and err.filename is not None:
        return f"{err.filename}: {err.strerror}; {expected}"
    return None


def dispatch(argv: list[str], commands: dict[str, tuple[str, str]], prog: str) -> int:
    """Run ``argv[0]``'s ``"module:function"`` with the rest of ``argv``; usage on no or an unknown command.

    Bad input (``error_message``) is printed as ``<prog> <command>: error: <message>`` (status 2), unless
    ``--debug`` comes before the command or ``VLSURV_DEBUG`` is set, which let the traceback through.
    """
    debug = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    while argv[:1] == [DEBUG_FLAG]:
        debug, argv = True, argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(prog, commands))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"{prog}: unknown command {name!r}\n\n{usage(prog, commands)}", file=sys.stderr)
        return 2
    module_name, func_name = commands[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    try:
        return int(func(rest) or 0)
    except (InputError, OSError) as err:
        message = None if debug else error_message(err)
        if message is None:
            raise
        print(f"{prog} {name}: error: {message}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    from vlsurv.progress import quiet_library_bars  # tqdm (~0.1 s) stays out of `import vlsurv.cli`

    quiet_library_bars()
    return dispatch(list(sys.argv[1:] if argv is None else argv), COMMANDS, "vlsurv")


if __name__ == "__main__":
    sys.exit(main())
