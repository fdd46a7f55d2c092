"""The committed Python stubs in agent/_proto are exactly what scripts/genproto.py makes of proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "agent" / "_proto"
STALE = "agent/_proto is stale: run `make proto` and commit the result"


def _stub_files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p
        for p in root.rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi") and "__pycache__" not in p.parts
    }


def test_committed_stubs_match_a_fresh_generation(tmp_path):
    out = tmp_path / "_proto"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"genproto failed:\n{result.stdout}\n{result.stderr}"

    generated, committed = _stub_files(out), _stub_files(COMMITTED)
    assert "mlsidecar/v1/ingest_pb2.py" in generated
    assert sorted(generated) == sorted(committed), STALE
    for name, path in generated.items():
        assert path.read_bytes() == committed[name].read_bytes(), f"{name}: {STALE}"


def test_stubs_import_without_the_server_stack():
    """The client SDK imports the stubs; they must not drag in FastAPI or uvicorn."""
    code = (
        "import sys, agent._proto.mlsidecar.v1.ingest_pb2_grpc; "
        "heavy = sorted(m for m in ('fastapi', 'uvicorn') if m in sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
