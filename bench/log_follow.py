"""Log following benchmark: CPU per line of following a chatty container's output.

    python3 bench/log_follow.py [--lines 4000] [--rounds 2] [--baseline OLD_SRC]

Starts a busybox container that writes ``--lines`` short lines about 0.3 ms apart (each
reaches the server as its own chunk, as an app logging one line per request does), follows
it with ``DockerEngine.container_log_lines`` on uvloop until the container exits, and
prints the CPU time of the following process per line. With ``--baseline SRC`` (a ``src``
directory, e.g. from ``git archive OLD src | tar -x -C /tmp/old``) the old code is measured
in the same run, alternating, and the ratio printed. Needs dockerd and the busybox image.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, subprocess, sys, time
from contextlib import aclosing
import uvloop
from cloudlet.runtimes.engine import DockerEngine

async def main(count):
    script = (f"i=0; while [ $i -lt {count} ]; do echo \\"line $i of the log\\"; "
              "i=$((i+1)); usleep 300; done")
    engine = DockerEngine()
    cid = subprocess.run(["docker", "run", "-d", "busybox", "sh", "-c", script],
                         capture_output=True, text=True, check=True).stdout.strip()
    try:
        before, lines = time.process_time(), 0
        async with aclosing(engine.container_log_lines(cid)) as stream:
            async for _ in stream:
                lines += 1
        print(lines, (time.process_time() - before) / lines * 1e6)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
        await engine.close()

uvloop.run(main(int(sys.argv[1])))
"""


def run(src: Path, count: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(count)],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(src)},
    ).stdout.split()
    if int(out[0]) != count:
        raise RuntimeError(f"followed {out[0]} lines of {count}")
    return float(out[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", help="also measure the engine client of this src dir")
    args = parser.parse_args()
    now: list[float] = []
    old: list[float] = []
    for _ in range(args.rounds):
        if args.baseline:
            old.append(run(Path(args.baseline), args.lines))
        now.append(run(REPO / "src", args.lines))
    report("now", now)
    if old:
        report("baseline", old)
        print(f"baseline/now: {statistics.median(old) / statistics.median(now):.2f}x")


def report(name: str, rounds: list[float]) -> None:
    median = statistics.median(rounds)
    print(f"{name}: {median:6.1f} us CPU per line (rounds: {[round(x) for x in rounds]})")


if __name__ == "__main__":
    main()
