"""Time `trl-cream inspect` on a finished run or study folder (e.g. the demo's `cream_demo/`).

    python benchmarks/inspect_page.py cream_demo --repeats 3

Prints the page's size and the median wall-clock and CPU seconds of `write_page` over ``--repeats`` runs (the page is
written to a temporary file, so the run folder is left as it is). Issue 25's goal: under 5 s on the demo's output."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from trl_cream.inspection.page import write_page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a finished (or running) run folder, or a study folder")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    walls, cpus, size = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            page = write_page(args.output_dir, Path(tmp) / "page.html")
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            size = page.stat().st_size
    print(
        f"{args.output_dir}: page {size / 2**20:.2f} MB; write_page median {statistics.median(walls):.2f} s wall, "
        f"{statistics.median(cpus):.2f} s CPU (of {args.repeats}; first run {walls[0]:.2f} s wall)"
    )


if __name__ == "__main__":
    main()
