"""Regenerate the Python stubs from protos/epwatch.proto (``make protos``).

The stubs are committed so that installing epwatch needs no protoc; a test fails when
they no longer match what this script would produce.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protos/epwatch.proto"
OUTPUTS = ("epwatch_pb2.py", "epwatch_pb2.pyi", "epwatch_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Run protoc (grpcio-tools) into ``out_root``; return the generated files."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / "protos" / name for name in OUTPUTS]


def stale_outputs() -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (ROOT / "protos" / f.name).exists()
            or (ROOT / "protos" / f.name).read_bytes() != f.read_bytes()
        ]


def main() -> int:
    generate(ROOT)
    print(f"generated {', '.join(OUTPUTS)} from {PROTO}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
