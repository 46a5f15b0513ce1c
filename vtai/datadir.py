"""The data dir (VTAI_DATA_DIR): created in one place, private, and ignored by git.

It holds secrets (``auth-secret``, ``pg-password``, ``pg-app-password``) and the database
cluster. A data dir placed inside a git checkout must never be committed, so it carries its own
``.gitignore`` that ignores everything in it, itself included.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

GITIGNORE = "# Written by VT.ai: this directory holds secrets and a database; never commit it.\n*\n"


def ensure(path: Path) -> Path:
    """Create the data dir if needed (mode 0700) and make sure git ignores all of it.

    Cheap enough to call on every start: an existing ``.gitignore`` is left as it is, and a
    data dir from before this change gets one the next time it is used.
    """
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    ignore = path / ".gitignore"
    if not ignore.exists():
        with contextlib.suppress(FileExistsError):
            fd = os.open(ignore, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(GITIGNORE)
    return path
