"""The dashboard: static files under api/static (package data), served by the API; offline, no CDN.

GET / (api/routers/system.py) answers `DASHBOARD_HTML`, the page; its scripts, styles and the vendored
chart library (uPlot, MIT, api/static/vendor/uplot) come from GET /static/<name>. Everything here is
public; every data call the page makes sends the API token the user pastes into it (kept in the
browser's localStorage, sent as `Authorization: Bearer`, never put in a URL). The page polls
GET /overview (one request per refresh) and follows a job's /jobs/{id}/events (SSE read with fetch,
because EventSource cannot send headers). Its own Content-Security-Policy (a meta tag) allows
scripts, styles and connections to this origin only.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.errors import NotFound

STATIC = Path(__file__).with_name("static")
DASHBOARD_HTML = (STATIC / "index.html").read_text(encoding="utf-8")
# Served by name from what the package ships (read once): a request names a file, never a path to walk.
FILES = {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*")) if p.is_file()}
TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


@router.get("/static/{name:path}")
def static_file(name: str) -> FileResponse:
    """A file of the dashboard (script, style, the chart library, its licence)."""
    path = FILES.get(name)
    if path is None:
        raise NotFound(f"no dashboard file named {name!r}", ["path", "name"])
    media = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain; charset=utf-8"
    # Revalidated each load (ETag / Last-Modified): an upgraded server never runs an old script.
    return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})
