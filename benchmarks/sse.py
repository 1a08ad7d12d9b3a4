"""100 live followers of one running job: trainer write -> client receive latency, and their cost to GETs.

    python benchmarks/sse.py                      # 100 followers, 100,000 finished + 3,000 queued jobs
    python benchmarks/sse.py --finished 10000 --queued 300 --duration 5

The real path, each part its own process: a writer appends step events to a run dir's events.jsonl
with the trainer's EventWriter (and one train.log line per step), at `--rate` steps/s; the worker's
relay (worker.relay.Relay with the worker's metric sink, pumped every supervisor poll) tails them,
XADDs them to the job's stream in its own Redis DB (`--redis`, db 5 by default) and stores the
metrics in Postgres; trainbox's API (`uvicorn api.app:app`, as benchmarks/api.py starts it, on a
fresh database seeded by benchmarks/api.py's seed) streams them to `--followers` SSE clients of the
one running job. The followers are one asyncio process with a minimal HTTP/1.1 client (not the SDK:
the load generator must cost less than what it measures). Each step event's latency is the
receive time minus the `time` the writer stamped on it.

Phases, one run, the writer and the relay running throughout:
  A  GETs alone: wrk on a bare FastAPI endpoint, then on GET /jobs/{id} (finished and queued jobs);
  B  the followers alone (latency);
  C  the followers and the same two wrk runs (latency, GETs);
  D  GETs alone again (so drift over the run shows).
Latencies are grouped by when the event was written (during B, or during C's trainbox wrk run).
Ratios compare C with the mean of A and D. The followers are the job owner's (the per-user stream
cap of 32 is raised to fit them: TRAINBOX_API_MAX_STREAMS_PER_USER); each resumes (Last-Event-ID)
from the stream's end as it was just before they connect, as a reconnecting client does, so only
what was written while they connect is caught up; a 429 while all connect at once is retried.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.api import PG_ADMIN, free_port, fresh_database, seed, start_server, stop_servers, wrk  # noqa: E402

REDIS_URL = os.environ.get("TRAINBOX_SSE_REDIS", "redis://127.0.0.1:6379/5")
JOB = "jr00000000"  # a running job of benchmarks.api.seed's box, owned by its first user
OWNER = "bench0"


# --- the writer (the trainer's side) ---------------------------------------------------------------


def _stop_on_term() -> dict[str, bool]:
    flag = {"stop": False}

    def handler(_sig: int, _frame: Any) -> None:
        flag["stop"] = True

    signal.signal(signal.SIGTERM, handler)
    return flag


def writer(a: argparse.Namespace) -> None:
    """Step events at `rate` per second with the trainer's own writer, and a log line per step."""
    from trainer.events import LOG_FILE, EventWriter

    run_dir = Path(a.run_dir)
    events = EventWriter(run_dir)
    flag = _stop_on_term()
    step, period = 500, 1.0 / a.rate
    next_at = time.monotonic()
    with (run_dir / LOG_FILE).open("a") as log:
        while not flag["stop"]:
            step += 1
            events.emit(
                "step",
                step=step,
                epoch=0,
                loss=round(2.0 + random.random(), 4),
                lr=5e-5,
                samples_per_s=41.2,
                tokens_per_s=21094.0,
                mfu=0.41,
                gpu_mem_gb=17.9,
                loss_scale=None,
                skipped=0,
                step_time_s=round(period, 4),
            )
            log.write(f"[rank 0] step {step} loss 2.3 21,094 tok/s mfu 41.0%\n")
            log.flush()
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    events.close()


# --- the relay (the worker's side) ------------------------------------------------------------------


def relay(a: argparse.Namespace) -> None:
    """The worker's relay for the job, pumped at the supervisor's poll interval, until SIGTERM."""
    from redis import Redis

    from core import keys
    from core.settings import get_settings
    from worker.relay import Relay
    from worker.runner import make_sink
    from worker.supervisor import supervise

    settings = get_settings()
    poll_s = inspect.signature(supervise).parameters["poll_s"].default
    r = Redis.from_url(REDIS_URL)
    rel = Relay(
        run_dir=Path(a.run_dir),
        job_id=JOB,
        redis=r,
        sink=make_sink(JOB, 1),
        stream_cap=settings.stream_maxlen,
        offsets_key=keys.job_relay_offsets(JOB),
    )
    flag = _stop_on_term()
    while not flag["stop"]:
        rel.pump()
        time.sleep(poll_s)
    rel.pump(final=True)


# --- the followers (the clients' side) --------------------------------------------------------------


async def _follow(
    i: int, a: argparse.Namespace, records: list[tuple[float, float, int]], state: dict[str, Any]
) -> None:
    """One SSE client: connect (retrying 429/503), then record every step event's latency."""
    request = (
        f"GET /jobs/{JOB}/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {a.token}\r\n"
        f"Accept: text/event-stream\r\nLast-Event-ID: {a.last_event_id}\r\n\r\n"
    ).encode()
    while True:
        reader, w = await asyncio.open_connection("127.0.0.1", a.port)
        w.write(request)
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            k, _, v = line.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        if status == 200:
            break
        w.close()
        if status not in (429, 503):
            state["errors"].append(status)
            return
        state["retries"] += 1
        await asyncio.sleep(0.05 + random.random() * 0.2)
    state["connected"] += 1
    if state["connected"] == a.n:
        Path(a.ready).write_text(str(time.time()))
    chunked = headers.get("transfer-encoding", "").lower() == "chunked"
    buf = b""
    try:
        while True:
            if chunked:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.time()
            buf = (buf + data).replace(b"\r\n", b"\n")
            *messages, buf = buf.split(b"\n\n")
            state["messages"] += len(messages)  # every SSE message, steps, logs and keep-alives alike
            for msg in messages:
                name, payload = b"", b""
                for line in msg.split(b"\n"):
                    if line.startswith(b"event:"):
                        name = line[6:].strip()
                    elif line.startswith(b"data:"):
                        payload = line[5:].strip()
                if name == b"step":
                    ev = json.loads(payload)
                    records.append((now, (now - ev["time"]) * 1000, ev["step"]))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    state["dropped"] += 1  # a job that is running forever: the stream should never end here
    w.close()


def followers(a: argparse.Namespace) -> None:
    """`--n` followers until SIGTERM; then (receive time, latency ms, step) per event to `--out`."""
    records: list[tuple[float, float, int]] = []
    state: dict[str, Any] = {"connected": 0, "retries": 0, "dropped": 0, "errors": [], "messages": 0}

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.create_task(_follow(i, a, records, state)) for i in range(a.n)]
        await stop.wait()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(run())
    Path(a.out).write_text(json.dumps({"records": records, **state}))


# --- the orchestration -------------------------------------------------------------------------------


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _sub(cmd: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), cmd, *args], cwd=REPO, env=env)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _cpu_seconds(procs: dict[str, subprocess.Popen[bytes]]) -> dict[str, float]:
    """CPU seconds (user + system) each process has used so far."""
    import psutil

    out = {}
    for name, proc in procs.items():
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(proc.pid).cpu_times()
            out[name] = t.user + t.system
    return out


def _cores(before: dict[str, float], after: dict[str, float], seconds: float) -> str:
    return ", ".join(f"{k} {(after[k] - before[k]) / seconds:.2f}" for k in after if k in before)


def _delivery(records: list[tuple[float, float, int]], n: int, t0: float, t1: float) -> tuple[int, int, int]:
    """(steps, receipts missing, receipts repeated) over the steps written between t0 and t1, while every
    follower was connected (a step's write time is its receive time less its latency)."""
    counts: dict[int, int] = {}
    for at, lat, step in records:
        if t0 <= at - lat / 1000 <= t1:
            counts[step] = counts.get(step, 0) + 1
    return len(counts), sum(max(0, n - c) for c in counts.values()), sum(max(0, c - n) for c in counts.values())


def _stream_end(redis_url: str) -> tuple[str, int]:
    """The job stream's last id and the last step in it (the followers start after them)."""
    from redis import Redis

    from core import events, keys

    r = Redis.from_url(redis_url)
    entries = r.xrevrange(keys.job_events(JOB), count=200)
    r.close()
    if not entries:
        raise SystemExit("the relay published nothing: is Redis up at " + redis_url + "?")
    last = entries[0][0].decode()
    step = next((e["step"] for _i, f in entries if (e := events.decode(f)).get("type") == "step"), 0)
    return last, int(step)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    w = sub.add_parser("writer")
    w.add_argument("--run-dir", required=True)
    w.add_argument("--rate", type=float, required=True)
    r = sub.add_parser("relay")
    r.add_argument("--run-dir", required=True)
    f = sub.add_parser("followers")
    for name in ("--port", "--n"):
        f.add_argument(name, type=int, required=True)
    for name in ("--token", "--last-event-id", "--ready", "--out"):
        f.add_argument(name, required=True)
    ap.add_argument("--followers", type=int, default=100)
    ap.add_argument("--rate", type=float, default=10.0, help="step events the writer appends per second")
    ap.add_argument("--finished", type=int, default=100_000)
    ap.add_argument("--queued", type=int, default=3000)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run and of phase B")
    ap.add_argument("--connections", type=int, default=16)
    a = ap.parse_args()
    if a.cmd:
        {"writer": writer, "relay": relay, "followers": followers}[a.cmd](a)
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    run(a)


def run(a: argparse.Namespace) -> None:
    from redis import Redis

    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, Postgres at "
        f"{PG_ADMIN.rpartition('@')[2]}, Redis {REDIS_URL.rpartition('@')[2]}; {a.followers} followers, "
        f"{a.rate:g} step events/s, wrk {a.connections} connections x {a.duration:g}s; load average "
        + " ".join(f"{x:.1f}" for x in os.getloadavg()),
        flush=True,
    )
    work = Path(tempfile.mkdtemp(prefix="trainbox-sse-"))
    procs: list[subprocess.Popen[bytes]] = []
    helpers: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        url = cleanup.enter_context(fresh_database(f"trainbox_sse_{os.getpid()}"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        cleanup.callback(stop_servers, procs)
        cleanup.callback(lambda: [_stop(p) for p in reversed(helpers)])
        (work / "data" / "corpus").mkdir(parents=True)
        data = seed(url, work / "data", finished=a.finished, queued=a.queued)
        print(f"seeded {a.finished:,} finished + {a.queued:,} queued jobs in {data['seed_s']:.1f}s", flush=True)
        Redis.from_url(REDIS_URL).flushdb()  # this benchmark's own DB: streams of earlier runs go
        env = {
            **os.environ,
            "TRAINBOX_DATA_DIR": str(work),
            "TRAINBOX_DATABASE_URL": url,
            "TRAINBOX_REDIS_URL": REDIS_URL,
            "TRAINBOX_API_MAX_STREAMS_PER_USER": str(max(32, a.followers + 8)),
        }
        tb_port, bare_port = free_port(), free_port()
        procs.append(start_server("api.app:app", tb_port, env))
        procs.append(start_server("benchmarks.api:bare", bare_port, env))
        tb, bare = f"http://127.0.0.1:{tb_port}", f"http://127.0.0.1:{bare_port}"
        run_dir = work / "runs" / JOB
        run_dir.mkdir(parents=True)
        helpers.append(_sub("relay", env, "--run-dir", str(run_dir)))
        time.sleep(2)  # the relay tails from the files' end: let it open them before the first line
        helpers.append(_sub("writer", env, "--run-dir", str(run_dir), "--rate", str(a.rate)))

        reads = [("GET", p, t, None) for pair in zip(data["finished"], data["queued"], strict=False) for p, t in pair]
        reads = reads or [("GET", p, t, None) for p, t in data["finished"]]
        bare_req = [("GET", "/ping", data["tokens"][OWNER], None)]
        opts = {"duration": a.duration, "connections": a.connections, "workdir": work}

        def gets() -> dict[str, dict[str, float]]:
            b = wrk(bare, bare_req, **opts)  # type: ignore[arg-type]
            t0 = time.time()
            t = wrk(tb, reads, **opts)  # type: ignore[arg-type]
            return {"bare": b, "tb": t, "window": (t0, time.time())}  # type: ignore[dict-item]

        wrk(tb, reads, duration=2, connections=a.connections, workdir=work)  # warm-up
        wrk(bare, bare_req, duration=2, connections=a.connections, workdir=work)
        phase_a = gets()

        last_id, last_step = _stream_end(REDIS_URL)
        ready, out = work / "ready", work / "followers.json"
        t_connect = time.time()
        fol = _sub(
            "followers",
            env,
            "--port",
            str(tb_port),
            "--n",
            str(a.followers),
            "--token",
            data["tokens"][OWNER],
            "--last-event-id",
            f"{last_id}:{last_step}",
            "--ready",
            str(ready),
            "--out",
            str(out),
        )
        helpers.append(fol)
        deadline = time.time() + 120
        while not ready.exists():
            if time.time() > deadline or fol.poll() is not None:
                raise SystemExit("the followers did not all connect within 120 s")
            time.sleep(0.1)
        connected_s = float(ready.read_text()) - t_connect
        time.sleep(2)  # settle: the connection burst is over
        watched = {"api": procs[0], "relay": helpers[0], "writer": helpers[1], "followers": fol}
        cpu0, b0 = _cpu_seconds(watched), time.time()
        time.sleep(a.duration)
        cpu1, phase_b = _cpu_seconds(watched), (b0, time.time())
        phase_c = gets()
        cpu2 = _cpu_seconds(watched)
        time.sleep(3)  # the events written at the end of C still arrive before the followers stop
        _stop(fol)
        helpers.remove(fol)
        result = json.loads(out.read_text())
        phase_d = gets()

    def window(w: tuple[float, float]) -> list[float]:
        # By write time (receive time less latency): a late follower's catch-up on older events is not live.
        return [lat for at, lat, _ in result["records"] if w[0] <= at - lat / 1000 <= w[1]]

    lat_b, lat_c = window(phase_b), window(phase_c["window"])  # type: ignore[arg-type]
    print(
        f"\n{a.followers} followers connected in {connected_s:.1f}s ({result['retries']} retries after 429/503, "
        f"{len(result['errors'])} refused, {result['dropped']} streams ended early)"
    )
    print("trainer write -> client receive, step events (all followers):")
    print(f"  {'phase':<28}{'events':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}")
    for label, lat in (("B followers only", lat_b), ("C followers + GET load", lat_c)):
        if not lat:
            print(f"  {label:<28}{0:>8}  no step event received")
            continue
        print(f"  {label:<28}{len(lat):>8}{pct(lat, 50):>9.1f}{pct(lat, 95):>9.1f}{pct(lat, 99):>9.1f}{max(lat):>9.1f}")
    c_s = phase_c["window"][1] - phase_b[1]  # type: ignore[index]
    # Steps written in B and C: every follower was connected, and stayed 3 s longer for the last ones.
    steps, missing, repeated = _delivery(result["records"], a.followers, phase_b[0], phase_c["window"][1])  # type: ignore[index]
    print(
        f"  delivery: {steps} steps x {a.followers} followers written in B and C: "
        f"{missing} receipts missing, {repeated} repeated"
    )
    lifetime = phase_c["window"][1] + 3 - (t_connect + connected_s)  # type: ignore[index]
    print(
        f"  {result['messages']:,} SSE messages (steps, logs, keep-alives) to the followers in {lifetime:.0f}s: "
        f"{result['messages'] / lifetime:,.0f}/s"
    )
    print(f"  cores used in B: {_cores(cpu0, cpu1, phase_b[1] - phase_b[0])}")
    print(f"  cores used in C: {_cores(cpu1, cpu2, c_s)} (wrk and the bare server not counted)")
    print("\nGET /jobs/{id} (finished and queued jobs, wrk):")
    head = f"{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'bare req/s':>12}{'x bare':>8}{'errors':>8}"
    print(f"  {'phase':<28}{head}")
    with_f = f"C {a.followers} followers"
    for label, ph in (("A no followers", phase_a), (with_f, phase_c), ("D no followers", phase_d)):
        t, b = ph["tb"], ph["bare"]
        print(
            f"  {label:<28}{t['rps']:>9,.0f}{t['p50']:>9.1f}{t['p95']:>9.1f}{t['p99']:>9.1f}{b['rps']:>12,.0f}"
            f"{t['rps'] / b['rps']:>8.3f}{int(t['errors']):>8}"
        )
    base_rps = (phase_a["tb"]["rps"] + phase_d["tb"]["rps"]) / 2
    base_p95 = (phase_a["tb"]["p95"] + phase_d["tb"]["p95"]) / 2
    print(
        f"  with / without followers (C against the mean of A and D): req/s {phase_c['tb']['rps'] / base_rps:.2f}x, "
        f"p95 {phase_c['tb']['p95'] / base_p95:.2f}x"
    )
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min)")
    if lat_c:
        print(
            f"goals: p95 write -> receive <= 100 ms with GETs running: {pct(lat_c, 95):.1f} ms; "
            f"GET /jobs/{{id}} >= 0.5x bare with p95 < 50 ms, with the followers: "
            f"{phase_c['tb']['rps'] / phase_c['bare']['rps']:.3f}x, p95 {phase_c['tb']['p95']:.1f} ms"
        )


if __name__ == "__main__":
    main()
