"""The ``vlsurv`` console script: one table maps each subcommand to its ``main(argv)``.

Modules are imported only when their subcommand runs, so ``vlsurv --help`` stays fast.
Each target is ``"module:function"`` where ``function(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

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
}


def usage(prog: str, commands: dict[str, tuple[str, str]]) -> str:
    """The command list of a ``prog <command> [options]`` tool."""
    width = max(map(len, commands))
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in commands.items()]
    lines += ["", f"`{prog} <command> --help` lists a command's options."]
    return "\n".join(lines)


def dispatch(
    argv: list[str],
    commands: dict[str, tuple[str, str]],
    prog: str,
    handled: tuple[type[Exception], ...] = (),
) -> int:
    """Run ``argv[0]``'s ``"module:function"`` with the rest of ``argv``; usage on no or an unknown command.

    An exception of a ``handled`` type is printed as ``<prog> <command>: error: <message>`` (status 2).
    """
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
    except handled as err:
        print(f"{prog} {name}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return dispatch(list(sys.argv[1:] if argv is None else argv), COMMANDS, "vlsurv")


if __name__ == "__main__":
    sys.exit(main())
