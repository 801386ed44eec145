"""The ``vlsurv`` console script: one table maps each subcommand to its ``main(argv)``.

Modules are imported only when their subcommand runs, so ``vlsurv --help`` stays fast.
Each target is ``"module:function"`` where ``function(argv: list[str]) -> int``.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vlsurv.data.synthetic:main", "write the synthetic CT cohort (NIfTI + manifest)"),
    "encode": ("vlsurv.encoders.cache:main", "encode every scan once into the feature cache"),
    "build-tiny": ("vlsurv.model.tiny:main", "build a tiny Llama decoder + tokenizer directory"),
    "train": ("vlsurv.train:main", "train stage 1 or stage 2 in one process (same code as accelerate)"),
    "predict": ("vlsurv.predict:main", "six answers and a risk per scan"),
    "evaluate": ("vlsurv.evaluate:main", "C-index, td-AUC, calibration, KM, BERTScore, report.html"),
    "demo": ("vlsurv.demo:main", "the whole pipeline on the synthetic cohort"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: vlsurv <command> [options]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`vlsurv <command> --help` lists a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"vlsurv: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, func_name = COMMANDS[name][0].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
