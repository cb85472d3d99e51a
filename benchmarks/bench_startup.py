"""How long the command line takes before it does anything: ``--help``, ``plugins`` and each
command's ``--help``, beside the cost of importing torch alone.

    python benchmarks/bench_startup.py               # 5 rounds, median and max per command
    python benchmarks/bench_startup.py --rounds 9

Each invocation is a fresh ``python -m craterlab ...`` process (what a user types), timed wall
clock; the commands are interleaved per round so machine load hits them alike. The reference
row, ``python -c "import torch, timm"``, is what every one of them paid before the built-in
components were registered by name (``"module:attribute"``, imported when built); the ratio
column is each command's median over that reference's median, measured in the same run.
Also reported: whether the process imported torch (it must not).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from craterlab.commands import BUILTIN

PROBE = (
    "import runpy, sys, atexit\n"
    "atexit.register(lambda: print('TORCH=%d' % ('torch' in sys.modules), file=sys.stderr))\n"
    "sys.argv = ['craterlab', *sys.argv[1:]]\n"
    "runpy.run_module('craterlab', run_name='__main__', alter_sys=True)\n"
)


def timed(args: list[str]) -> tuple[float, bool]:
    """Wall seconds of one fresh process, and whether it imported torch."""
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env=ENV)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0,):
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed, "TORCH=1" in done.stderr


ENV = dict(os.environ, HF_HUB_OFFLINE="1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cases: dict[str, list[str]] = {"import torch, timm (reference)": []}
    cases["--help"] = ["--help"]
    cases["plugins"] = ["plugins"]
    cases.update({f"{name} --help": [name, "--help"] for name in BUILTIN})
    times: dict[str, list[float]] = {name: [] for name in cases}
    torch_seen: dict[str, bool] = {}
    for _ in range(args.rounds):
        for name, argv in cases.items():
            if not argv:
                cmd = [sys.executable, "-c", "import torch, timm"]
                seconds, _ = timed(cmd)
            else:
                seconds, torch_seen[name] = timed([sys.executable, "-c", PROBE, *argv])
            times[name].append(seconds)
    reference = statistics.median(times["import torch, timm (reference)"])
    load = os.getloadavg()[0]
    print(f"{args.rounds} rounds, load average {load:.1f}, {os.cpu_count()} CPUs\n")
    print("| invocation | median s | max s | / import torch+timm | imports torch |")
    print("|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        seen = "-" if name not in torch_seen else ("yes" if torch_seen[name] else "no")
        print(
            f"| `{name}` | {median:.2f} | {max(values):.2f} | {median / reference:.2f} | {seen} |"
        )


if __name__ == "__main__":
    main()
