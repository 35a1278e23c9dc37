"""Regenerate the Python stubs from protos/epwatch.proto (``make protos``).

The stubs are committed so that installing epwatch needs no protoc; a test fails when
they no longer match what this script would produce.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "epwatch.proto"
# Where the schema sits in the import namespace: the stubs import each other as
# ``epwatch.protos.epwatch_pb2``, which protoc derives from the file's include path.
PACKAGE_PATH = Path("epwatch", "protos")
OUTPUTS = ("epwatch_pb2.py", "epwatch_pb2.pyi", "epwatch_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) and put the stubs in ``out_dir``; return their paths."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        include, out = Path(tmp, "include"), Path(tmp, "out")
        (include / PACKAGE_PATH).mkdir(parents=True)
        out.mkdir()
        shutil.copyfile(PROTO, include / PACKAGE_PATH / PROTO.name)
        args = [
            "protoc",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(include / PACKAGE_PATH / PROTO.name),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in OUTPUTS:
            shutil.copyfile(out / PACKAGE_PATH / name, out_dir / name)
    return [out_dir / name for name in OUTPUTS]


def stale_outputs() -> list[str]:
    """Names of committed stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        return [
            f.name
            for f in fresh
            if not (HERE / f.name).exists() or (HERE / f.name).read_bytes() != f.read_bytes()
        ]


def main() -> int:
    generate(HERE)
    print(f"generated {', '.join(OUTPUTS)} from {PROTO.name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
