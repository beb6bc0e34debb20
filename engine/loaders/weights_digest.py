"""sha256 of a checkpoint's weight files: the `weights_digest` of the KV fingerprint.

Hashing 100 MB to many GB on every start would dominate start-up, so digests are memoized
in `$XDG_CACHE_HOME/baton/digests.json` (default `~/.cache/baton/`) under each file's
absolute path, size and mtime; touching or replacing a file invalidates its entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

_CHUNK_BYTES = 1 << 20
_MAX_CACHE_ENTRIES = 256


def weights_digest(files: Sequence[Path]) -> str:
    """Hex sha256 over the files' bytes, concatenated in the given order."""
    key = json.dumps([_file_identity(f) for f in files])
    cache = _read_cache()
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for path in files:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
    digest = h.hexdigest()
    cache[key] = digest
    _write_cache(dict(list(cache.items())[-_MAX_CACHE_ENTRIES:]))
    return digest


def digest_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "baton" / "digests.json"


def _file_identity(path: Path) -> list[str | int]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(digest_cache_path().read_text())
    except (OSError, ValueError):
        return {}  # absent or corrupt: a cache miss, never an error
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def _write_cache(cache: dict[str, str]) -> None:
    path = digest_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename so concurrent workers never read a half-written file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(cache, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the next start a re-hash
