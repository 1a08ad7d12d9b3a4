"""Rendezvous ports: the scheduler hands each job a port no other job on the box holds, but a process
outside trainbox may be listening on it; the worker checks before launch and moves the job if so."""

from __future__ import annotations

import logging
import socket

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from core.db import session_scope
from core.models import Job
from core.settings import get_settings

log = logging.getLogger(__name__)


def port_is_free(port: int) -> bool:
    """Nothing listens on this TCP port (the ranks' rendezvous binds every interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def ensure_free_port(job_id: str, attempt: int, port: int) -> int:
    """The job's port if it is free, else another free one from the box's range, recorded on the job
    (the unique (box, port) index keeps two jobs from taking the same one)."""
    if port_is_free(port):
        return port
    settings = get_settings()
    with session_scope() as session:
        box = session.scalar(select(Job.box).where(Job.id == job_id))
        taken = set(session.scalars(select(Job.master_port).where(Job.box == box, Job.master_port.is_not(None))))
    for candidate in range(settings.port_base, settings.port_base + settings.port_count):
        if candidate in taken or not port_is_free(candidate):
            continue
        try:
            with session_scope() as session:
                moved = session.execute(
                    update(Job).where(Job.id == job_id, Job.attempt == attempt).values(master_port=candidate)
                    .execution_options(synchronize_session=False)
                ).rowcount  # fmt: skip
        except IntegrityError:
            continue  # another job took it a moment ago
        if moved:
            log.warning("job %s: port %s is used outside trainbox; using %s", job_id, port, candidate)
            return candidate
        break
    raise RuntimeError(f"no free rendezvous port in {settings.port_base}..{settings.port_base + settings.port_count}")
