"""Cost of the live dashboard: the quick-start trained with and without the live view.

Runs ``cockpit run configs/quickstart.yaml`` alternately with ``--live`` (inside ``script``, which
gives it a pseudo-terminal, so Rich draws the full-screen cockpit) and ``--no-live``, and prints
the training seconds the run manifests record (start-up and figures excluded), median over
``--repeats``. Run it by hand on a quiet machine:

    python benchmarks/dashboard_overhead.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def training_seconds(live: bool, out: Path, extra: list[str]) -> float:
    """Train the quick-start once and return ``timings.train_seconds`` from its manifest."""
    command = [sys.executable, "-m", "cockpit_cli", "run", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out),
               "--name", "run", "--overwrite", "--set", "output.figures=false", "--live" if live else "--no-live", *extra]
    if live:
        command = ["script", "-q", "-e", "-c", shlex.join(command), "/dev/null"]
    env = {"COLUMNS": "160", "LINES": "50", "TERM": "xterm-256color", "PATH": "/usr/bin:/bin"}
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    return float(json.loads((out / "run" / "run.json").read_text())["timings"]["train_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set for both runs")
    args = parser.parse_args()
    if shutil.which("script") is None:
        sys.exit("needs the `script` command (util-linux) to give the live run a terminal")
    extra = [item for override in args.overrides for item in ("--set", override)]
    times: dict[str, list[float]] = {"live": [], "plain log": []}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.repeats):
            times["live"].append(training_seconds(True, Path(folder), extra))
            times["plain log"].append(training_seconds(False, Path(folder), extra))
    base = statistics.median(times["plain log"])
    print(f"{'mode':<10} {'median s':>9} {'vs plain log':>13}  runs")
    for mode, values in times.items():
        median = statistics.median(values)
        print(f"{mode:<10} {median:>9.2f} {100 * (median / base - 1):>+12.1f}%  {', '.join(f'{v:.2f}' for v in values)}")


if __name__ == "__main__":
    main()
