"""Where one API request's CPU goes: the app in-process (httpx's ASGI transport, no network), a fresh
Postgres database, N requests in a row under yappi (CPU time over every thread, so the thread pool's
work is seen), and the same N against a bare FastAPI endpoint for scale.

    python benchmarks/profile_request.py GET /jobs/j1 [-n 300]
    python benchmarks/profile_request.py POST /jobs -n 100      # submits a preset:tiny spec

Prints ms per request (wall, both apps), CPU ms per request under the profiler, thread-pool hand-offs
per request and the project's and libraries' functions by total time. Needs `pip install yappi`
(a profiling aid, not a dependency of trainbox). TRAINBOX_BENCH_PG: the Postgres server (a database is
created and dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PG_ADMIN = os.environ.get("TRAINBOX_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
SPEC = {
    "name": "p",
    "model": "preset:tiny",
    "dataset": {"path": "c.jsonl"},
    "gpus": 1,
    "seq_len": 64,
    "max_steps": 10,
    "deepspeed": {"train_batch_size": 4},
}
SHOWN = ("/api/", "/core/", "/trainer/", "sqlalchemy", "psycopg", "fastapi", "starlette", "anyio", "pydantic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("method", choices=["GET", "POST"])
    p.add_argument("path")
    p.add_argument("-n", type=int, default=300)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--jobs", type=int, default=60, help="finished jobs of the caller's stored (a list page is full)")
    args = p.parse_args()

    import psycopg
    import yappi

    name = "trainbox_prof_" + secrets.token_hex(4)
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    try:
        run(args, PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name, yappi)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def run(args: argparse.Namespace, url: str, yappi) -> None:  # noqa: ANN001 - an optional tool's module
    import httpx
    from fastapi import FastAPI

    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data"
    data.mkdir()
    (data / "c.jsonl").write_text("".join(json.dumps({"text": "word " * 50}) + "\n" for _ in range(300)))
    os.environ.update(
        TRAINBOX_DATABASE_URL=url,
        TRAINBOX_DATA_DIR=str(tmp),
        TRAINBOX_DATA_ROOT=str(data),
        TRAINBOX_REDIS_URL=os.environ.get("TRAINBOX_BENCH_REDIS", "redis://127.0.0.1:6379/4"),
        TRAINBOX_MAX_QUEUED_PER_USER="1000000",
        TRAINBOX_SUBMIT_RATE_PER_MINUTE="1000000",
    )
    from api.app import create_app
    from core.db import make_engine, make_sessionmaker, upgrade
    from core.models import Job
    from core.settings import get_settings
    from core.users import create_token, create_user

    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as s:
        create_user(s, name="u")
        _, token = create_token(s, user_name="u")
        latest = {"step": 100, "epoch": 1, "loss": 1.25, "lr": 5e-05, "tokens_per_s": 6400.0, "time": 1.7e9}
        for i in range(1, args.jobs + 1):
            job = Job(id=f"j{i}", name="n", owner="u", state="succeeded", spec=SPEC, gpus=1, attempt=1)
            job.step, job.total_steps, job.latest = 100, 100, latest
            s.add(job)
        s.commit()
    engine.dispose()
    get_settings.cache_clear()
    app = create_app(get_settings(), dispatch=None)
    bare = FastAPI()

    @bare.get("/")
    async def root() -> dict[str, bool]:
        return {"ok": True}

    headers = {"Authorization": f"Bearer {token}"}

    @asynccontextmanager
    async def nothing():  # noqa: ANN202
        yield

    async def timed(target: FastAPI, method: str, path: str) -> float:
        async with app.router.lifespan_context(app) if target is app else nothing():
            transport = httpx.ASGITransport(app=target)
            async with httpx.AsyncClient(transport=transport, base_url="http://bench") as c:

                def once():  # noqa: ANN202
                    return (
                        c.post(path, headers=headers, json=SPEC) if method == "POST" else c.get(path, headers=headers)
                    )

                first = await once()
                assert first.status_code in (200, 201), first.text
                began = time.perf_counter()
                for _ in range(args.n):
                    await once()
                return (time.perf_counter() - began) / args.n * 1000

    print(f"bare GET /: {asyncio.run(timed(bare, 'GET', '/')):.2f} ms per request (wall)")
    print(f"{args.method} {args.path}: {asyncio.run(timed(app, args.method, args.path)):.2f} ms per request (wall)")
    yappi.set_clock_type("cpu")
    yappi.start()
    asyncio.run(timed(app, args.method, args.path))
    yappi.stop()
    stats = yappi.get_func_stats()
    n = args.n + 1
    cpu = sum(f.tsub for f in stats)
    hops = sum(f.ncall for f in stats if f.name.endswith("run_sync_in_worker_thread")) / n
    print(f"under yappi: {cpu / n * 1000:.1f} ms CPU per request, {hops:.1f} thread-pool hand-offs per request")
    stats.sort("ttot", "desc")
    shown = [f for f in stats if any(part in f.module for part in SHOWN) and "__call__" not in f.name]
    for f in shown[: args.top]:
        module = f.module.split("site-packages/")[-1].split("/work/main/")[-1]
        print(f"{f.ttot / n * 1000:8.3f} ms  {f.ncall / n:5.1f}/req  {module}:{f.lineno} {f.name}")


if __name__ == "__main__":
    main()
