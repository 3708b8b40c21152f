"""`s3prl-ekd` command line: one thin subcommand per library function.

Each module listed in COMMAND_MODULES defines `register_cli(subparsers)`, which
adds its subcommand(s) and sets `func(args) -> int` on them.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "s3prl_ekd.s3prl_bridge",  # pretrain, downstream, link, register
    "s3prl_ekd.corpus",  # corpus synth
    "s3prl_ekd.export",  # export
    "s3prl_ekd.prepare",  # prepare {pr,asr,sid,er,all}
    "s3prl_ekd.superb",  # superb
    "s3prl_ekd.bench",  # bench
    "s3prl_ekd.teacher_training",  # teachers train
    "s3prl_ekd.demo",  # demo
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3prl-ekd",
        description="Ensemble knowledge distillation of SSL speech models (s3prl plugin)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    from s3prl_ekd.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    # pretrain/downstream forward their arguments untouched to s3prl's scripts.
    if argv and argv[0] in ("pretrain", "downstream"):
        from s3prl_ekd import s3prl_bridge
        try:
            return s3prl_bridge.PASSTHROUGH[argv[0]](argv[1:])
        except UserError as error:
            print(f"s3prl-ekd {argv[0]}: error: {error}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"s3prl-ekd {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
