"""python -m bench [--quick] [--json OUT]: run every case, print a table, write JSON."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from bench import daemon, ddp, gpu, instructions, loop, save, sweep, switches

CASES = {"loop": loop.measure, "switches": switches.measure, "save": save.measure, "daemon": daemon.measure,
         "ddp": ddp.measure, "gpu": gpu.measure, "sweep": sweep.measure,
         "instructions": instructions.measure}
COLUMNS = ("case", "traind", "baseline", "ratio", "goal", "verdict")


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, noisier figures)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/latest.json"), help="where to write results")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for docs/)")
    parser.add_argument("cases", nargs="*", choices=[[], *CASES], help="cases to run (default all)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = []
    for name in args.cases or CASES:
        rows += CASES[name](quick=args.quick)
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in COLUMNS]
    print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(COLUMNS, widths)))
    machine = {"python": platform.python_version(), "torch": torch.__version__, "cpu": _cpu(),
               "cores": os.cpu_count(), "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "seconds": round(time.monotonic() - started)}
    if args.markdown:
        print()
        print("| " + " | ".join(COLUMNS + ("detail",)) + " |")
        print("|" + "---|" * (len(COLUMNS) + 1))
        for r in rows:
            print("| " + " | ".join(str(r[c]) for c in COLUMNS + ("detail",)) + " |")
        print(f"\n{machine}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "quick": args.quick, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
