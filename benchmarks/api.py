"""What the API's hot paths cost against a bare FastAPI endpoint, with a long history and a long queue.

    python benchmarks/api.py                      # 100,000 finished jobs; 3,000 then 0 queued
    python benchmarks/api.py --queued 3000 --duration 5 --repeats 1

For each queue length: a fresh Postgres database (dropped after) is migrated and seeded in bulk
(one INSERT ... SELECT generate_series per kind of job): `--finished` succeeded jobs, `--queued`
queued jobs, one box whose 3 GPUs are held by 3 running jobs (so every submit runs a real
scheduling pass that places nothing), 8 users with a token and an uploaded dataset each.
trainbox (`uvicorn api.app:app`) and a bare FastAPI app (`uvicorn benchmarks.api:bare`) run side by
side under the same uvicorn settings (one process each, asyncio loop, h11, no access log); Debian's
`wrk` drives each endpoint, bare and trainbox alternating, `--repeats` times, and reports req/s,
p50/p95/p99 and the ratio to the bare endpoint measured just before it.

Requests are spread over the 8 users' tokens (each request's path names one of its user's own
jobs), so the admission caps (24 in flight, 6 per user) are the service's own; with 16 connections
no user has more than 6 in flight for long. The per-user queue cap and submit rate are raised
(TRAINBOX_MAX_QUEUED_PER_USER, TRAINBOX_SUBMIT_RATE_PER_MINUTE): the benchmark submits thousands of
jobs a minute. Jobs submitted by a POST run are deleted after it, so each run sees the seeded queue.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastapi import FastAPI  # noqa: E402

USERS = 8
BOX_GPUS = 3
PG_ADMIN = os.environ.get("TRAINBOX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TRAINBOX_BENCH_REDIS", "redis://127.0.0.1:6379/11")

bare = FastAPI()


@bare.get("/ping")
async def ping() -> dict[str, bool]:
    return {"ok": True}


SPEC = {
    "name": "bench",
    "model": "preset:tiny",
    "dataset": {"path": "corpus/train.jsonl"},
    "gpus": 1,
    "seq_len": 64,
    "max_steps": 100,
    "max_runtime_s": 3600,
    "deepspeed": {"train_batch_size": 8, "gradient_accumulation_steps": 2},
}


# --- seeding ----------------------------------------------------------------------------------------


def seed(url: str, data_root: Path, *, finished: int, queued: int) -> dict[str, Any]:
    """Bulk-insert the history, the queue, a full box, users, tokens and uploads; returns what to request."""
    import random

    from sqlalchemy import text

    from core.db import make_engine, make_sessionmaker
    from core.models import Dataset, utcnow
    from core.scheduler import GpuInfo, register_box
    from core.users import create_token, create_user

    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    users, tokens, datasets = [f"bench{i}" for i in range(USERS)], {}, {}
    uploads = data_root / "uploads"
    uploads.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"text": f"example number {i} " * 20}) + "\n" for i in range(300))
    with sessions() as s:
        for name in users:
            create_user(s, name=name)
            _, tokens[name] = create_token(s, user_name=name)
            ds_id = "dbench" + secrets.token_hex(6)
            (uploads / ds_id).write_text(lines)
            s.add(
                Dataset(
                    id=ds_id,
                    owner=name,
                    filename="train.jsonl",
                    format="jsonl",
                    text_field="text",
                    records=300,
                    bytes=len(lines.encode()),
                    sha256="0" * 64,
                    created_at=utcnow(),
                )
            )
            datasets[name] = ds_id
        s.commit()
        register_box(s, "bench-box", [GpuInfo(i, "NVIDIA GeForce RTX 4090", 24564) for i in range(BOX_GPUS)])
        s.commit()
    spec_json = json.dumps(SPEC)
    owners = "ARRAY[" + ",".join(f"'{u}'" for u in users) + "]"
    common = (
        "INSERT INTO jobs (id, name, owner, state, spec, gpus, priority, attempt, max_attempts, cancel_requested,"
        " created_at, updated_at, started_at, finished_at, total_steps, step, epoch, latest, error)"
    )
    with engine.begin() as conn:
        t0 = time.perf_counter()
        # Finished: a week of history before the queue; each with its final progress cached.
        conn.execute(
            text(
                common
                + " SELECT 'jf' || lpad(i::text, 8, '0'), 'bench-done', ("
                + owners
                + ")[1 + i % "
                + str(USERS)
                + "], 'succeeded', CAST(:spec AS jsonb), 1, 0, 1, 3, false,"
                " now() - interval '8 days' + i * interval '5 seconds',"
                " now() - interval '8 days' + i * interval '5 seconds',"
                " now() - interval '8 days' + i * interval '5 seconds',"
                " now() - interval '8 days' + i * interval '6 seconds',"
                " 100, 100, 0, CAST(:latest AS jsonb), NULL FROM generate_series(1, :n) AS i"
            ),
            {
                "spec": spec_json,
                "n": finished,
                "latest": json.dumps(
                    {"step": 100, "loss": 1.9, "lr": 1e-4, "samples_per_s": 40.0, "time": time.time()}
                ),
            },
        )
        # Running: the three jobs holding the box's GPUs, halfway, so the queue's head gets ETAs.
        now = time.time()
        conn.execute(
            text(
                common
                + " SELECT 'jr' || lpad(i::text, 8, '0'), 'bench-run', ("
                + owners
                + ")[1 + i % "
                + str(USERS)
                + "], 'running', CAST(:spec AS jsonb), 1, 0, 1, 3, false, now() - interval '1 hour', now(),"
                " now() - interval '1 hour', NULL, 1000, 500 + i * 100, 0, CAST(:latest AS jsonb), NULL"
                " FROM generate_series(0, :n - 1) AS i"
            ),
            {
                "spec": spec_json,
                "n": BOX_GPUS,
                "latest": json.dumps({"step": 500, "loss": 2.1, "lr": 1e-4, "samples_per_s": 40.0, "time": now}),
            },
        )
        conn.execute(text("UPDATE gpus SET job_id = 'jr' || lpad(index::text, 8, '0') WHERE box = 'bench-box'"))
        conn.execute(text("UPDATE jobs SET box = 'bench-box', gpu_ids = CAST('[0]' AS jsonb) WHERE state = 'running'"))
        # Queued: submitted over the last hour, two priorities.
        conn.execute(
            text(
                common
                + " SELECT 'jq' || lpad(i::text, 8, '0'), 'bench-wait', ("
                + owners
                + ")[1 + i % "
                + str(USERS)
                + "], 'queued', CAST(:spec AS jsonb), 1 + i % 2, CASE WHEN i % 10 = 0 THEN 1 ELSE 0 END, 1, 3, false,"
                " now() - interval '1 hour' + i * interval '1 millisecond', now(),"
                " NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                " FROM generate_series(1, :n) AS i"
            ),
            {"spec": spec_json, "n": queued},
        )
        # The box stays live for the whole run (its worker is not running here).
        conn.execute(text("UPDATE boxes SET heartbeat_at = now() + interval '1 day'"))
        seeded_s = time.perf_counter() - t0
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    _after_seed(engine)
    rows = {}
    with engine.connect() as conn:
        for state in ("succeeded", "queued"):
            rows[state] = conn.execute(
                text("SELECT id, owner FROM jobs WHERE state = :s ORDER BY random() LIMIT 2000"), {"s": state}
            ).all()
    engine.dispose()
    pairs = {state: [(f"/jobs/{job_id}", tokens[owner]) for job_id, owner in found] for state, found in rows.items()}
    random.shuffle(users)
    return {
        "tokens": tokens,
        "datasets": datasets,
        "finished": pairs["succeeded"],
        "queued": pairs["queued"],
        "seed_s": seeded_s,
    }


def _after_seed(engine: Any) -> None:
    """What the service does after a bulk change of the queue: one scheduling pass (places nothing here)."""
    from core.db import make_sessionmaker
    from core.scheduler import schedule

    with make_sessionmaker(engine)() as s:
        schedule(s, None)


# --- servers and the load generator -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(target: str, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        target,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--loop",
        "asyncio",
        "--http",
        "h11",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{target} did not start")


def stop_servers(procs: list[subprocess.Popen[bytes]]) -> None:
    """Stop what start_server started (SIGTERM, then SIGKILL after 10 s)."""
    for p in procs:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


LUA = """
local reqs = {%(reqs)s}
local i = 0
request = function()
  i = i + 1
  local r = reqs[(i %% #reqs) + 1]
  return wrk.format(r[1], r[2], r[3], r[4])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %%d %%d %%.0f %%.0f %%.0f %%d %%d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), e.status,
    e.connect + e.read + e.write + e.timeout))
end
"""


def _lua_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid Lua string literal for ASCII text


def wrk(
    base: str,
    requests: list[tuple[str, str, str | None, str | None]],
    *,
    duration: float,
    connections: int,
    workdir: Path,
) -> dict[str, float]:
    """Run wrk over the (method, path, token, body) list in turn; req/s, p50/p95/p99 in ms, error counts."""
    entries = []
    for method, path, token, body in requests:
        headers = ['["Content-Type"]="application/json"'] if body else []
        if token:
            headers.append(f'["Authorization"]={_lua_str("Bearer " + token)}')
        fields = [_lua_str(method), _lua_str(path), "{" + ",".join(headers) + "}", _lua_str(body) if body else "nil"]
        entries.append("{" + ",".join(fields) + "}")
    script = workdir / f"wrk-{secrets.token_hex(4)}.lua"
    script.write_text(LUA % {"reqs": ",\n".join(entries)})
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(duration))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            base,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, dur_us, p50, p95, p99, status_err, sock_err = (int(float(v)) for v in line.split()[1:])
    return {
        "rps": n / (dur_us / 1e6),
        "p50": p50 / 1000,
        "p95": p95 / 1000,
        "p99": p99 / 1000,
        "errors": status_err + sock_err,
        "requests": n,
    }


def post_requests(data: dict[str, Any]) -> list[tuple[str, str, str | None, str | None]]:
    out = []
    for user, token in data["tokens"].items():
        body = {**SPEC, "name": "bench-post", "dataset": {"id": data["datasets"][user]}}
        out.append(("POST", "/jobs", token, json.dumps(body)))
    return out


def delete_posted(url: str) -> None:
    import psycopg

    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        conn.execute("DELETE FROM jobs WHERE name = 'bench-post'")


def profiler(pid: int, args: argparse.Namespace, label: str, queued: int) -> subprocess.Popen[bytes]:
    """py-spy sampling the trainbox server (every thread) for the length of one wrk run."""
    slug = "".join(c if c.isalnum() else "_" for c in label).strip("_")
    out = Path(args.profile) / f"{queued}-{slug}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(args.duration))),
        "--rate",
        "200",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


PROJECT = ("api/", "core/", "trainer/", "worker/")


def summarize_profile(path: Path, top: int = 12) -> list[str]:
    """The project's functions by share of samples they are on the stack (inclusive), from py-spy's raw output."""
    total, inclusive = 0, {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        seen = set()
        for frame in stack.split(";"):
            if frame.split("(", 1)[-1].startswith(PROJECT) and frame not in seen:
                seen.add(frame)
                inclusive[frame] = inclusive.get(frame, 0) + n
    rows = sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]
    return [f"{n / max(total, 1):6.1%}  {frame}" for frame, n in rows]


# --- one run -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(name: str) -> Iterator[str]:
    """A new Postgres database `name` on PG_ADMIN's server, migrated; yields its SQLAlchemy URL and
    drops it afterwards (also one left over by an earlier, killed run of the same name)."""
    import psycopg

    from core.db import upgrade

    base, _, _ = PG_ADMIN.rpartition("/")
    url = f"{base}/{name}".replace("postgresql://", "postgresql+psycopg://")
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_one(queued: int, args: argparse.Namespace) -> list[tuple[str, list[dict[str, float]], list[dict[str, float]]]]:
    work = Path(tempfile.mkdtemp(prefix="trainbox-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as cleanup:
        url = cleanup.enter_context(fresh_database(f"trainbox_bench_{os.getpid()}_{queued}"))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        cleanup.callback(stop_servers, procs)
        (work / "data" / "corpus").mkdir(parents=True)
        data = seed(url, work / "data", finished=args.finished, queued=queued)
        print(f"seeded {args.finished:,} finished + {queued:,} queued jobs in {data['seed_s']:.1f}s", flush=True)
        env = {
            **os.environ,
            "TRAINBOX_DATA_DIR": str(work),
            "TRAINBOX_DATABASE_URL": url,
            "TRAINBOX_REDIS_URL": REDIS_URL,
            "TRAINBOX_MAX_QUEUED_PER_USER": "100000000",
            "TRAINBOX_SUBMIT_RATE_PER_MINUTE": "100000000",
        }
        tb_port, bare_port = free_port(), free_port()
        procs.append(start_server("api.app:app", tb_port, env))
        procs.append(start_server("benchmarks.api:bare", bare_port, env))
        tb, bare_base = f"http://127.0.0.1:{tb_port}", f"http://127.0.0.1:{bare_port}"
        some_token = next(iter(data["tokens"].values()))
        endpoints: list[tuple[str, list[tuple[str, str, str | None, str | None]]]] = [
            ("GET /jobs/{finished}", [("GET", p, t, None) for p, t in data["finished"]]),
            ("GET /jobs?limit=50", [("GET", "/jobs?limit=50", t, None) for t in data["tokens"].values()]),
            ("GET /healthz", [("GET", "/healthz", None, None)]),
            ("POST /jobs", post_requests(data)),
        ]
        if data["queued"]:
            endpoints.insert(1, ("GET /jobs/{queued}", [("GET", p, t, None) for p, t in data["queued"]]))
        bare_req = [("GET", "/ping", some_token, None)]
        results: dict[str, tuple[list[dict[str, float]], list[dict[str, float]]]] = {e: ([], []) for e, _ in endpoints}
        opts = {"duration": args.duration, "connections": args.connections, "workdir": work}
        # Warm-up: imports, connection pools, caches.
        wrk(tb, endpoints[0][1], duration=2, connections=args.connections, workdir=work)
        wrk(bare_base, bare_req, duration=2, connections=args.connections, workdir=work)
        for _ in range(args.repeats):
            for label, reqs in endpoints:
                b = wrk(bare_base, bare_req, **opts)  # type: ignore[arg-type]
                spy = profiler(procs[0].pid, args, label, queued) if args.profile and not results[label][1] else None
                t = wrk(tb, reqs, **opts)  # type: ignore[arg-type]
                if spy is not None:
                    spy.wait(60)
                if label.startswith("POST"):
                    time.sleep(2)  # requests wrk gave up on at the end may still be committing
                    delete_posted(url)
                results[label][0].append(b)
                results[label][1].append(t)
        return [(label, *results[label]) for label, _ in endpoints]


def table(queued: int, rows: list[tuple[str, list[dict[str, float]], list[dict[str, float]]]]) -> dict[str, float]:
    print(f"\n{queued:,} queued jobs")
    print(
        f"{'endpoint':<22}{'req/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'bare req/s':>12}{'ratio':>8}"
        f"{'errors':>8}   per repeat (req/s)"
    )
    rps = {}
    for label, bares, tbs in rows:
        med = statistics.median
        t_rps, b_rps = med(r["rps"] for r in tbs), med(r["rps"] for r in bares)
        rps[label] = t_rps
        print(
            f"{label:<22}{t_rps:>9,.0f}{med(r['p50'] for r in tbs):>9.1f}{med(r['p95'] for r in tbs):>9.1f}"
            f"{med(r['p99'] for r in tbs):>9.1f}{b_rps:>12,.0f}{t_rps / b_rps:>8.3f}"
            f"{sum(int(r['errors']) for r in tbs):>8}   " + " / ".join(f"{r['rps']:,.0f}" for r in tbs)
        )
    return rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queued", default="3000,0", help="queue lengths to measure, in order")
    ap.add_argument("--finished", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per wrk run")
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--profile", metavar="DIR", help="py-spy the trainbox server during each endpoint's first run")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk not found: apt-get install -y wrk")
    print(
        f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, Postgres at "
        f"{PG_ADMIN.rpartition('@')[2]}; {args.connections} connections, {args.duration:g}s per run, "
        f"{args.repeats} alternating repeats (medians shown)"
    )
    figures = {}
    for q in (int(x) for x in args.queued.split(",")):
        figures[q] = table(q, run_one(q, args))
        if args.profile:
            for path in sorted(Path(args.profile).glob(f"{q}-*.txt")):
                print(f"  profile {path.stem} (share of samples with the function on the stack, all threads):")
                for line in summarize_profile(path):
                    print("    " + line)
    if len(figures) == 2:
        (long_q, long_r), (short_q, short_r) = figures.items()
        print(f"\nreq/s with {short_q:,} queued / with {long_q:,} queued (goal <= 1.2):")
        for label in short_r:
            if label in long_r:
                print(f"  {label:<22}{short_r[label] / long_r[label]:.2f}")


if __name__ == "__main__":
    main()
