"""Generate the Python stubs for proto/ into agent/_proto/.

Usage: python scripts/genproto.py [OUT_DIR]   (default: agent/_proto)

The generated modules import each other as ``mlsidecar.v1...``; they are rewritten
to ``agent._proto.mlsidecar.v1...`` so the stubs live inside the package and the
client SDK can import them without any path tweaking.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    include = str(Path(protoc.__file__).parent / "_proto")
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"-I{include}",
            f"--python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            *sources,
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    written = sorted(p for p in out_dir.rglob("*.py*") if p.is_file())
    for path in written:
        text = path.read_text()
        fixed = re.sub(r"^from mlsidecar\.", "from agent._proto.mlsidecar.", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
    for package in {p.parent for p in written} | {out_dir}:
        current = package
        while current != out_dir.parent:
            (current / "__init__.py").touch()
            current = current.parent
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "agent" / "_proto"
    for p in generate(target):
        print(p.relative_to(target.parent) if target.parent in p.parents else p)
