"""What the s3prl.hub start-up hook (`s3prl_ekd_hub.pth`) costs every Python start in an environment.

Two copies of this environment's site-packages are made as folders of links, identical but for the
hook's .pth file, and `python -S -c "import site; site.addsitedir(COPY)"` is timed in each, the two
interleaved run by run (this machine's load changes from second to second). Prints the medians and
their difference; `--json OUT` writes them.

    .venv/bin/python benchmarks/startup_hook.py [--runs 60] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

PTH = "s3prl_ekd_hub.pth"


def link_farm(site: Path, target: Path, with_hook: bool) -> Path:
    target.mkdir()
    for entry in site.iterdir():
        if entry.suffix == ".pth":
            if entry.name != PTH or with_hook:
                (target / entry.name).write_text(entry.read_text())
        else:
            (target / entry.name).symlink_to(entry)
    return target


def start_seconds(site: Path) -> float:
    code = f"import site; site.addsitedir({str(site)!r})"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-S", "-c", code], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / PTH).is_file():
        raise SystemExit(f"{site / PTH} is not installed here; run `s3prl-ekd register` first")
    with tempfile.TemporaryDirectory() as tmp:
        with_hook = link_farm(site, Path(tmp) / "with", True)
        without = link_farm(site, Path(tmp) / "without", False)
        for folder in (with_hook, without):  # warm the file cache and the .pyc files
            start_seconds(folder)
        times: dict[str, list[float]] = {"with": [], "without": []}
        for _ in range(args.runs):
            times["with"].append(start_seconds(with_hook))
            times["without"].append(start_seconds(without))
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    result = {"runs": args.runs, "python": platform.python_version(), "machine": platform.machine(),
              "median_ms_with_hook": round(medians["with"], 2), "median_ms_without_hook": round(medians["without"], 2),
              "difference_ms": round(medians["with"] - medians["without"], 2),
              "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
