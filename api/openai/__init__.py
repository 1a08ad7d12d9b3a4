"""The OpenAI fine-tuning API under /v1: a second view of the same datasets and jobs (docs/OPENAI.md).

Mounted by api/app.py in the one app: the same tokens, users, ownership, quotas and limits. `routers`
go behind `current_user`; `OpenAIErrors` gives /v1 OpenAI's error envelope; `UPLOAD_PATH` is an upload
path for the body limits and for authenticating before the body is read.

The routes are left out of /openapi.json: that document describes trainbox's own API and error shape,
and the contract of /v1 is OpenAI's API reference, with trainbox's differences in docs/OPENAI.md.
"""

from __future__ import annotations

from api.openai import files, jobs
from api.openai.errors import OpenAIErrors

UPLOAD_PATH = files.PATH
routers = (files.router, jobs.router)

__all__ = ["UPLOAD_PATH", "OpenAIErrors", "routers"]
