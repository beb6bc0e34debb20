"""Regenerates the committed Python stubs of every `proto/baton/v1/*.proto`.

    python -m proto.generate          # rewrite the stubs in place
    python -m proto.generate --check  # exit 1 if a committed stub is stale

protoc names generated modules after the proto package (`baton.v1`), but the stubs live in
the `proto.baton.v1` package (a top-level `baton` package is the CLI), so imports between
generated modules are rewritten to package-relative ones.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PACKAGE_DIR = PROTO_ROOT / "baton" / "v1"
_ABSOLUTE_IMPORT = re.compile(r"^from baton\.v1 import ", re.MULTILINE)


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs of every proto in PACKAGE_DIR into `out_dir`; returns their paths."""
    sources = sorted(PACKAGE_DIR.glob("*.proto"))
    if not sources:
        raise FileNotFoundError(f"no .proto files under {PACKAGE_DIR}")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(s.relative_to(PROTO_ROOT)) for s in sources),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {', '.join(s.name for s in sources)}")
        written = []
        out_dir.mkdir(parents=True, exist_ok=True)
        for stub in sorted((Path(tmp) / "baton" / "v1").iterdir()):
            text = _ABSOLUTE_IMPORT.sub("from . import ", stub.read_text())
            assert "baton.v1 import" not in text, f"unrewritten import left in {stub.name}"
            target = out_dir / stub.name
            target.write_text(text)
            written.append(target)
        return written


def stale_stubs() -> list[str]:
    """Names of committed stubs that differ from (or are missing next to) a fresh build."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (PACKAGE_DIR / f.name).is_file()
            or (PACKAGE_DIR / f.name).read_bytes() != f.read_bytes()
        ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proto.generate", description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if a stub is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_stubs()
        if stale:
            print(f"stale stubs (run `make proto`): {', '.join(stale)}", file=sys.stderr)
            return 1
        return 0
    for path in generate(PACKAGE_DIR):
        print(f"wrote {path.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
