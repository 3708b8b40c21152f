"""`s3prl-ekd` command line: one thin subcommand per library function.

`pretrain` and `downstream` hand their arguments, untouched, to s3prl's own scripts (see
plugin/runner.py). Each module in COMMAND_MODULES defines `register_cli(subparsers)`, which
adds its subcommand(s) and sets `func(args) -> int` on them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = [
    "s3prl_ekd.demo.corpus",  # corpus synth
    "s3prl_ekd.plugin.targets",  # targets {build,merge}
    "s3prl_ekd.tools.export",  # export
    "s3prl_ekd.recipes.prepare",  # prepare {pr,asr,sid,er,all}
    "s3prl_ekd.recipes.superb",  # superb
    "s3prl_ekd.tools.bench",  # bench
    "s3prl_ekd.demo.teacher_training",  # teachers train
    "s3prl_ekd.demo.pipeline",  # demo
]
PASSTHROUGH = ("pretrain", "downstream")


def _register_plugin_commands(subparsers) -> None:
    from s3prl_ekd.plugin import hub, runner

    subparsers.add_parser("pretrain", add_help=False,
                          help="s3prl's run_pretrain.py (same arguments), e.g. -u ekd_distiller -g CONFIG -n NAME")
    subparsers.add_parser("downstream", add_help=False, help="s3prl's run_downstream.py (same arguments), plus "
                          "--memoize-upstream GIB and --early-stop N")

    p = subparsers.add_parser("link", help="make `run_pretrain.py -u ekd_distiller` work in an s3prl checkout")
    p.add_argument("s3prl_dir", nargs="?", help="s3prl checkout or package folder (default: the installed s3prl)")
    p.add_argument("--unlink", action="store_true", help="remove what link created")

    def _link(args):
        if args.unlink:
            removed = runner.unlink(args.s3prl_dir)
            print(f"removed {removed}" if removed else "nothing to unlink")
        else:
            print(f"linked {runner.link(args.s3prl_dir)}")
        return 0

    p.set_defaults(func=_link)

    p = subparsers.add_parser("register", help="write (or --unregister: remove) the start-up hook that adds "
                                               "ekd_distiller to s3prl.hub (a wheel install ships it already)")
    p.add_argument("--unregister", action="store_true")

    def _register(args):
        if args.unregister:
            removed = hub.unregister()
            print(f"removed {removed}" if removed else "no start-up hook to remove")
        else:
            print(f"wrote {hub.register()}")
        return 0

    p.set_defaults(func=_register)

    p = subparsers.add_parser("configs", help="list the shipped pretraining configs (-g / -c), or print one's path")
    p.add_argument("name", nargs="?", help="e.g. tiny_cpu_runner.yaml: print its path")

    def _configs(args):
        from s3prl_ekd.io.resources import pretrain_config, pretrain_config_names

        names = [args.name] if args.name else pretrain_config_names()
        for name in names:
            print(pretrain_config(name) if args.name else f"{name}\t{pretrain_config(name)}")
        return 0

    p.set_defaults(func=_configs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3prl-ekd",
        description="Ensemble knowledge distillation of SSL speech models (s3prl plugin)")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _register_plugin_commands(subparsers)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def user_message(error: Exception) -> str:
    """The message of a user error; for one re-raised from a DataLoader worker, the original line."""
    text = str(error).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def main(argv: list[str] | None = None) -> int:
    from s3prl_ekd.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv else None
    try:
        if command == "pretrain":
            from s3prl_ekd.plugin.runner import run_pretrain

            return run_pretrain(argv[1:])
        if command == "downstream":
            from s3prl_ekd.plugin.downstream import run_downstream

            return run_downstream(argv[1:])
        args = build_parser().parse_args(argv)
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
