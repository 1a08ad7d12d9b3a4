"""`python -m migrations [upgrade|downgrade] [REVISION]`: migrate the database of TRAINBOX_DATABASE_URL."""

from __future__ import annotations

import sys

from core.db import downgrade, upgrade
from core.settings import get_settings


def main(argv: list[str]) -> int:
    action = argv[0] if argv else "upgrade"
    if action not in ("upgrade", "downgrade"):
        print("usage: python -m migrations [upgrade|downgrade] [REVISION]", file=sys.stderr)
        return 2
    url = get_settings().database_url
    if action == "upgrade":
        upgrade(url, argv[1] if len(argv) > 1 else "head")
    else:
        downgrade(url, argv[1] if len(argv) > 1 else "-1")
    print(f"{action} done: {url.split('@')[-1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
