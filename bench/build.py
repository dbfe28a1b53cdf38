"""Build and deploy times of the seed's Django app (examples/django-mysite).

Starts its own `cloudlet server` (temporary home, free ports), then, on a copy of the app:

- cold: `cloudlet builds submit --no-cache --tag IMAGE` (every layer again, pip downloads);
- warm: one line of the app's code changed, then `cloudlet builds submit --tag IMAGE`
  (the dependency layer comes from the cache: the Dockerfile copies requirements.txt first);
- deploy-to-ready: `cloudlet run deploy` of the built image until the CLI reports it ready
  (it waits for the revision's first instance to accept connections), then the first
  request through the router.

Prints each time, the medians and the cold/warm ratio (the goal is at least 5x). Bounded:
`--repeat` cold and warm builds (default 1), each about 5-60 s depending on the network.

    python bench/build.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
APP = REPO / "examples" / "django-mysite"
IMAGE = "cloudlet-bench/my-dj-app"
SERVICE = "bench-dj"
GOAL = 5.0


class Server:
    """A `cloudlet server` subprocess with its own home, on free ports."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDLET_")}
        self.env["CLOUDLET_HOME"] = str(home)
        self.log = (home / "server.log").open("wb")
        command = [sys.executable, "-m", "cloudlet", "server", "--port", "0", "--api-port", "0"]
        self.proc = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not (home / "server.json").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: see {home / 'server.log'}")
            time.sleep(0.05)
        self.router = json.loads((home / "server.json").read_text())["router"]

    def cli(self, *args: str) -> float:
        """Runs `cloudlet ARGS`; the seconds it took."""
        return self.run(*args)[0]

    def run(self, *args: str) -> tuple[float, str]:
        """Runs `cloudlet ARGS`; the seconds it took and what it printed on stdout."""
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "cloudlet", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"cloudlet {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return took, done.stdout

    def build(self, app: Path, *flags: str) -> tuple[float, float]:
        """`builds submit` of the app: (seconds of the command, seconds the server built)."""
        took, out = self.run(
            "builds", "submit", *flags, "--tag", IMAGE, "--format", "json", str(app)
        )
        record = json.loads(out)
        start, finish = (datetime.fromisoformat(record[k]) for k in ("startTime", "finishTime"))
        return took, (finish - start).total_seconds()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        owner = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=cloudlet.service={SERVICE}"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        if owner:
            subprocess.run(["docker", "rm", "-f", *owner], capture_output=True, check=False)


def change_source(app: Path, n: int) -> None:
    """A code-only change: one more comment line in the view module."""
    views = app / "mysite" / "views.py"
    views.write_text(views.read_text() + f"# bench change {n}\n")


def first_request(router: str) -> float:
    started = time.perf_counter()
    response = httpx.get(f"{router}/", headers={"Host": f"{SERVICE}.localhost"}, timeout=60)
    response.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="cold+warm build pairs (1-5)")
    repeat = min(max(parser.parse_args().repeat, 1), 5)
    with tempfile.TemporaryDirectory(prefix="cloudlet-bench-") as tmp:
        app = Path(tmp) / "django-mysite"
        shutil.copytree(APP, app)
        home = Path(tmp) / "home"
        home.mkdir()
        server = Server(home)
        try:
            cold, warm = [], []
            for n in range(repeat):
                cold.append(server.build(app, "--no-cache"))
                change_source(app, n)
                warm.append(server.build(app))
                print(
                    f"run {n + 1}: cold {cold[-1][0]:.1f} s ({cold[-1][1]:.1f} s in the server), "
                    f"warm {warm[-1][0]:.1f} s ({warm[-1][1]:.1f} s in the server)",
                    flush=True,
                )
            deploy = server.cli(
                "run", "deploy", SERVICE, "--image", IMAGE, "--allow-unauthenticated"
            )
            request = first_request(server.router)
        finally:
            server.stop()
            subprocess.run(["docker", "rmi", IMAGE], capture_output=True, check=False)
    report(cold, warm, deploy, request)


def report(
    cold: list[tuple[float, float]], warm: list[tuple[float, float]], deploy: float, request: float
) -> None:
    for index, what in ((0, "`builds submit` command"), (1, "build in the server")):
        cold_s = statistics.median(c[index] for c in cold)
        warm_s = statistics.median(w[index] for w in warm)
        ratio = cold_s / warm_s
        verdict = "met" if ratio >= GOAL else "NOT met"
        print(f"{what} (median of {len(cold)}):")
        print(f"  cold (--no-cache)        {cold_s:6.1f} s")
        print(f"  warm (code change only)  {warm_s:6.1f} s")
        print(f"  cold / warm              {ratio:6.1f}x  (goal >= {GOAL:.0f}x: {verdict})")
    print(f"deploy to ready            {deploy:6.1f} s  (`run deploy`, until it returns)")
    print(f"first request after that   {request * 1000:6.0f} ms")


if __name__ == "__main__":
    main()
