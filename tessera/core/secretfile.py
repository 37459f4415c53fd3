"""Secrets kept in files only their owner can read: the Prefect server's auth string and Ray's
cluster token. Created with mode 0600 in a folder of mode 0700 (never widened by the umask, never
briefly readable by others), and an existing file readable by others is narrowed to 0600."""
from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path

OWNER_ONLY = 0o600


def secret_file(path: str | os.PathLike, new_secret=lambda: secrets.token_hex(32)) -> str:
    """The secret in `path`, created from `new_secret()` when the file is missing."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, OWNER_ONLY)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            os.chmod(path, OWNER_ONLY)
        return path.read_text().strip()
    value = new_secret()
    with os.fdopen(fd, "w") as f:
        f.write(value)
        f.flush()
        os.fsync(f.fileno())
    return value


def main(argv: list[str] | None = None) -> int:
    """`python -m tessera.core.secretfile PATH`: create the secret file when missing; prints nothing,
    so that the secret never lands in a terminal or a log."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m tessera.core.secretfile PATH", file=sys.stderr)
        return 2
    secret_file(args[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
