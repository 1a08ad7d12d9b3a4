"""The OpenAI fine-tuning API under /v1: a second view of the same datasets and jobs (docs/OPENAI.md).

Mounted by api/app.py in the one app: the same tokens, users, ownership, quotas and limits. `routers`
go behind `current_user`; `OpenAIErrors` gives /v1 OpenAI's error envelope; `UPLOAD_PATH` is an upload
path for the body limits and for authenticating before the body is read.
"""

from __future__ import annotations

from api.openai import files, jobs
from api.openai.errors import OpenAIErrors

UPLOAD_PATH = files.PATH
routers = (files.router, jobs.router)

__all__ = ["UPLOAD_PATH", "OpenAIErrors", "routers"]
