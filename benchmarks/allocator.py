"""One command under several memory-allocator settings at the same time, side by side on the same cores.

    python benchmarks/allocator.py --variants glibc,thp --json OUT.json -- s3prl-ekd superb ... --out {out}

Each variant runs the command once with `{out}` replaced by OUT_DIR/<variant>; all variants start together,
so they share whatever else the machine does. Reported per variant: wall seconds, user and system CPU
seconds, minor page faults (from wait4's rusage), and each ratio to the first variant. With --same FILE
(e.g. results.json) the variants' FILEs must hold equal "tasks" (an allocator must not change a result).

Variants:
- glibc: glibc malloc for everything (THP_MEM_ALLOC_ENABLE=0, which s3prl-ekd's own subprocesses inherit).
- thp: THP_MEM_ALLOC_ENABLE=1, PyTorch's CPU allocator asks for transparent huge pages for tensors of 2 MiB
  and more (fewer page faults; needs /sys/kernel/mm/transparent_hugepage/enabled at madvise or always).
- jemalloc: LD_PRELOAD=libjemalloc.so.2, freed pages kept for reuse (`apt-get install libjemalloc2` first;
  the project does not install it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

VARIANTS = {
    "glibc": {"THP_MEM_ALLOC_ENABLE": "0"},
    "thp": {"THP_MEM_ALLOC_ENABLE": "1"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": "dirty_decay_ms:10000,muzzy_decay_ms:10000"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="glibc,thp")
    parser.add_argument("--out", default="allocator-out", help="OUT_DIR: one folder per variant")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--same", help="a file every variant writes under {out} whose 'tasks' must be equal")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    names = args.variants.split(",")
    if not command or any(n not in VARIANTS for n in names):
        parser.error(f"give a command after --, and variants among {', '.join(VARIANTS)}")

    running = {}
    for name in names:
        out = Path(args.out) / name
        out.parent.mkdir(parents=True, exist_ok=True)
        argv = [part.replace("{out}", str(out)) for part in command]
        log = open(Path(args.out) / f"{name}.log", "w")
        process = subprocess.Popen(argv, env={**os.environ, **VARIANTS[name]}, stdout=log, stderr=subprocess.STDOUT)
        running[process.pid] = (name, time.perf_counter(), log)
    figures = {}
    while running:
        pid, status, usage = os.wait4(-1, 0)
        name, started, log = running.pop(pid)
        log.close()
        figures[name] = {"exit": os.waitstatus_to_exitcode(status), "wall_s": round(time.perf_counter() - started, 1),
                         "user_s": round(usage.ru_utime, 1), "sys_s": round(usage.ru_stime, 1),
                         "minor_faults": usage.ru_minflt, "max_rss_mb": round(usage.ru_maxrss / 1024)}
    first = figures[names[0]]
    for name in names:
        for key in ("wall_s", "user_s", "sys_s"):
            figures[name][f"{key[:-2]}_ratio"] = round(figures[name][key] / max(first[key], 1e-9), 3)
        cpu = figures[name]["user_s"] + figures[name]["sys_s"]
        figures[name]["cpu_ratio"] = round(cpu / max(first["user_s"] + first["sys_s"], 1e-9), 3)
        print(name, json.dumps(figures[name]))
    if args.same:
        tasks = {n: json.loads((Path(args.out) / n / args.same).read_text())["tasks"] for n in names}
        equal = all(t == tasks[names[0]] for t in tasks.values())
        print("results equal:" if equal else "results DIFFER:", json.dumps(tasks))
        figures["results_equal"] = equal
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    if any(f["exit"] for n, f in figures.items() if n in names):
        raise SystemExit("a variant failed; see its log in " + args.out)


if __name__ == "__main__":
    main()
