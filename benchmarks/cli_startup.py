"""How long ``fxgndi --help`` takes against ``python -c "import torch"``, in one run.

Each command runs ``--repeat`` times in a fresh interpreter, alternating, and the median wall
time of each is printed with their ratio (the CLI must answer in at most 1.5x the time of
importing torch: it imports neither torch nor torch-pruning, scipy, scikit-learn or
matplotlib for help).

    python benchmarks/cli_startup.py --repeat 10
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from fxgndi.core.report import format_table

COMMANDS = {
    'python -c "import torch"': [sys.executable, "-c", "import torch"],
    "fxgndi --help": [sys.executable, "-m", "fxgndi", "--help"],
    "fxgndi prune --help": [sys.executable, "-m", "fxgndi", "prune", "--help"],
}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args(argv)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.repeat):
        for name, cmd in COMMANDS.items():  # interleaved: load drifts hit all alike
            start = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    base = medians['python -c "import torch"']
    print(format_table([(name, 1e3 * m, m / base) for name, m in medians.items()],
                       ["command", "median ms", "vs import torch"], floatfmt=".3g"))
    return medians


if __name__ == "__main__":
    main()
