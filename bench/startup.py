"""Start-up: what every `lvbackup` invocation pays before its command does any work.

The command line imports a command's module only when that command runs (lvbackup/cli/),
so `--version` and a small command like `list` no longer load the whole program. Prints,
for each case, the best of N wall times and the mean CPU time, and the interpreter's own
start (`python -c pass`) to subtract.

    .venv/bin/python bench/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import lvbackup_cmd, write_lvbackup_config


def measure(argv: list[str], repeat: int, cwd: str) -> tuple[float, float]:
    """(best wall time, mean CPU time (user + system)) of `repeat` runs: the CPU time is
    what the start-up costs, the least disturbed by other load on a shared machine."""
    walls = []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       cwd=cwd)
        walls.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return min(walls), cpu / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    lvb = lvbackup_cmd()
    with tempfile.TemporaryDirectory() as tmp:
        config = str(write_lvbackup_config(Path(tmp)))
        subprocess.run([lvb, "--config", config, "init"], stdout=subprocess.DEVNULL, check=True)
        cases = {
            "python -c pass": [sys.executable, "-c", "pass"],
            "python -c 'import lvbackup.cli'": [sys.executable, "-c", "import lvbackup.cli"],
            "lvbackup --version": [lvb, "--version"],
            "lvbackup --help": [lvb, "--help"],
            "lvbackup --config X list": [lvb, "--config", config, "list"],
        }
        # From a directory of its own: `python -c` puts the current directory first on
        # sys.path, and a checkout there would be imported instead of the installed package.
        for name, argv in cases.items():
            wall, cpu = measure(argv, args.repeat, tmp)
            print(f"{name:34} wall {wall:6.3f} s  cpu {cpu:6.3f} s", flush=True)


if __name__ == "__main__":
    main()
