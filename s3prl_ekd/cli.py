"""`s3prl-ekd` command line: one thin subcommand per library function.

Each module in COMMANDS defines `register_cli(subparsers)`, which adds its subcommand(s) and sets
`func(args) -> int` on them. Only the module of the command being run is imported, so that
`s3prl-ekd --help`, `env` and `corpus synth` work where s3prl (or a GPU stack) is missing.
A user error prints one line, `s3prl-ekd COMMAND: error: ...`, and exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# command -> (module defining it, one-line help shown by `s3prl-ekd --help`)
COMMANDS = {
    "pretrain": ("s3prl_ekd.plugin.runner", "distil a student with s3prl's run_pretrain.py (-u ekd_distiller)"),
    "downstream": ("s3prl_ekd.plugin.downstream", "train / evaluate a downstream task with s3prl's "
                                                   "run_downstream.py"),
    "superb": ("s3prl_ekd.recipes.superb", "train + test an upstream on PR/SID/ER/ASR; writes results.json/.md"),
    "targets": ("s3prl_ekd.plugin.targets", "teacher-target store: run the teachers once, distil many students"),
    "export": ("s3prl_ekd.tools.export", "export a student: a SUPERB submission folder or a transformers model"),
    "merge": ("s3prl_ekd.tools.merge", "average students trained from one initialisation, in weight space"),
    "inspect": ("s3prl_ekd.tools.info", "print what a checkpoint holds (step, configs, teachers, size)"),
    "env": ("s3prl_ekd.tools.info", "print the versions and set-up a bug report needs"),
    "configs": ("s3prl_ekd.tools.info", "list the shipped pretraining configs, or print one's path"),
    "prepare": ("s3prl_ekd.recipes.prepare", "make the PR/ASR/SID/ER layouts from a manifest or the real corpora"),
    "corpus": ("s3prl_ekd.demo.corpus", "synthetic speech corpora (espeak-ng)"),
    "teachers": ("s3prl_ekd.demo.teacher_training", "train small teachers without labels (demo)"),
    "demo": ("s3prl_ekd.demo.pipeline", "the paper's experiment in miniature on a synthetic corpus (CPU)"),
    "bench": ("s3prl_ekd.tools.bench", "time the distillation step, live and from a target store"),
    "link": ("s3prl_ekd.plugin.runner", "make `run_pretrain.py -u ekd_distiller` work in an s3prl checkout"),
    "register": ("s3prl_ekd.patches", "write (or --unregister: remove) the start-up hook that adds "
                                      "ekd_distiller to s3prl.hub"),
}
# Commands that run without s3prl installed; every other one first checks the stack (one line if unusable).
NO_S3PRL = ("env", "corpus", "register")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (others get a placeholder with their help)."""
    parser = argparse.ArgumentParser(
        prog="s3prl-ekd", description="Ensemble knowledge distillation of SSL speech models (an s3prl plugin)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show every warning and progress frame of s3prl, torch and torchaudio")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    if command in COMMANDS:
        importlib.import_module(COMMANDS[command][0]).register_cli(subparsers)
    for name, (_, text) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=text, add_help=False)
    return parser


def user_message(error: Exception) -> str:
    """The message of a user error; for one re-raised from a DataLoader worker, the original line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _command(argv: list[str]) -> str | None:
    """The subcommand named in `argv` (after the global options), or None."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    from s3prl_ekd.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    command = _command(argv)
    try:
        if command in COMMANDS and command not in NO_S3PRL:
            from s3prl_ekd.stack import require_stack

            try:
                require_stack()
            except ImportError as error:
                raise UserError(str(error)) from None
        args = build_parser(command if command in COMMANDS else None).parse_args(argv)
        from s3prl_ekd.patches import quiet

        with quiet(verbose=args.verbose):
            return int(args.func(args) or 0)
    except UserError as error:
        close_progress_bars()
        rank = f" rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}:" if "RANK" in os.environ else ""
        print(f"s3prl-ekd {command}:{rank} error: {user_message(error)}", file=sys.stderr)
        return 2


def close_progress_bars() -> None:
    """Close s3prl's open tqdm bars now, so that they do not redraw below the error line at exit."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


def entry() -> None:
    """The console script: main(), then exit. After an error, exit without running atexit hooks:
    s3prl's runner leaves writers (tensorboardX) and threads behind whose own tracebacks would
    follow the one-line error (on a full disk, every flush fails again)."""
    code = main()
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
