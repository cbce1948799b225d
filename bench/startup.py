"""Start-up: what every `lvbackup` invocation pays before its command does any work.

The command line imports a command's module only when that command runs (lvbackup/cli/),
so `--version` and a small command like `list` no longer load the whole program. Prints,
for each case, the best of N wall times (the least disturbed by other load), and the
interpreter's own start (`python -c pass`) to subtract.

    .venv/bin/python bench/startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import lvbackup_cmd, write_lvbackup_config


def best_of(argv: list[str], repeat: int, cwd: str) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                       cwd=cwd)
        times.append(time.perf_counter() - start)
    return min(times)


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
            print(f"{name:34} {best_of(argv, args.repeat, tmp):6.3f} s", flush=True)


if __name__ == "__main__":
    main()
