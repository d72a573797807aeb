"""Start a service on a free loopback port, and run a bounded load against it: ``total`` POST /segment requests
from ``clients`` threads.

Loopback use only (tests and bench/bench_serve.py): a load stops after ``total`` requests or ``time_limit``
seconds.
"""
from __future__ import annotations

import http.client
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Sequence, Tuple

# `python -m sdca_serve`, or the same main() behind a prefix of your own (the tests block torch and sdca first).
MODULE = ("-m", "sdca_serve")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, *args: str, python_args: Sequence[str] = MODULE, timeout: float = 60.0,
           **popen) -> Tuple[subprocess.Popen, int]:
    """A service process for ``model`` on a free loopback port, returned once GET /health answers 200."""
    port = free_port()
    process = subprocess.Popen([sys.executable, *python_args, model, "--port", str(port), "--log-level", "warning",
                                *args], **popen)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            output = process.stdout.read() if process.stdout else ""
            raise RuntimeError(f"the service exited with status {process.returncode}: {output}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return process, port
        except OSError:
            time.sleep(0.2)
        finally:
            conn.close()
    process.kill()
    raise RuntimeError(f"the service did not answer /health within {timeout:.0f} s")


def load(port: int, bodies: Sequence[bytes], *, total: int = 1000, clients: int = 16, host: str = "127.0.0.1",
         content_type: str = "image/png", output: str = "labels", time_limit: float = 300.0) -> Dict:
    """Latency percentiles (ms), requests/s and the status of every request (keep-alive connection per client)."""
    lock = threading.Lock()
    next_index = [0]
    latencies: List[float] = []
    statuses: Dict[int, int] = {}
    failures: List[str] = []
    stop_at = time.perf_counter() + time_limit

    def take() -> int:
        with lock:
            i = next_index[0]
            next_index[0] += 1
            return i

    def client(_):
        conn = http.client.HTTPConnection(host, port, timeout=60)
        try:
            while time.perf_counter() < stop_at:
                i = take()
                if i >= total:
                    return
                start = time.perf_counter()
                try:
                    conn.request("POST", f"/segment?output={output}", body=bodies[i % len(bodies)],
                                 headers={"Content-Type": content_type})
                    response = conn.getresponse()
                    response.read()
                    status = response.status
                except (OSError, http.client.HTTPException) as exc:
                    conn.close()
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                    with lock:
                        failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            conn.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - start
    done = len(latencies)
    ms = sorted(1000 * t for t in latencies)
    pick = lambda q: ms[min(len(ms) - 1, int(q * len(ms)))] if ms else float("nan")  # noqa: E731
    return {"requests": done, "connection_failures": failures, "statuses": statuses,
            "errors": len(failures) + sum(n for s, n in statuses.items() if s != 200),
            "p50_ms": pick(0.50), "p99_ms": pick(0.99), "mean_ms": statistics.fmean(ms) if ms else float("nan"),
            "requests_per_s": done / wall if wall > 0 else float("nan"), "seconds": wall}
