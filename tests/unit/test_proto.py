"""The generated gRPC modules match proto/*.proto (regenerate with `make proto`)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_fresh(tmp_path):
    protos = sorted((ROOT / "proto").glob("*.proto"))
    assert protos
    (tmp_path / "proto").mkdir()
    for p in protos:
        shutil.copy(p, tmp_path / "proto" / p.name)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.",
                    "--grpc_python_out=.", "--pyi_out=.", *[f"proto/{p.name}" for p in protos]],
                   cwd=tmp_path, check=True)
    generated = sorted(f.name for f in (tmp_path / "proto").iterdir() if f.suffix in (".py", ".pyi"))
    assert generated
    for name in generated:
        fresh = (tmp_path / "proto" / name).read_text()
        assert (ROOT / "proto" / name).read_text() == fresh, f"proto/{name} is stale: run make proto"
