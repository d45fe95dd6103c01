"""Generated code must match proto/: regenerate into a temp dir and compare."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "src" / "metald" / "gen"


def _protos() -> list[str]:
    """The list `make proto` generates (the Makefile's PROTOS), so the two cannot drift."""
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^PROTOS := (.+)$", makefile, re.MULTILINE)
    assert match, "the Makefile has no PROTOS list"
    return match.group(1).split()


def test_every_proto_is_generated() -> None:
    on_disk = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    assert sorted(_protos()) == on_disk


@pytest.mark.parametrize("proto", _protos())
def test_generated_code_is_fresh(tmp_path: Path, proto: str) -> None:
    plugin = Path(sys.executable).parent / "protoc-gen-connectrpc"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--plugin=protoc-gen-connectrpc={plugin}",
            f"--connectrpc_out={tmp_path}",
            "--connectrpc_opt=protobuf=google",
            proto,
        ],
        check=True,
    )
    package, stem = str(Path(proto).parent), Path(proto).stem
    for name in (f"{stem}_pb2.py", f"{stem}_pb2.pyi", f"{stem}_connect.py"):
        fresh = (tmp_path / package / name).read_text()
        committed = (GEN / package / name).read_text()
        assert fresh == committed, f"{package}/{name} is stale: run `make proto`"
    for init in (GEN / package.split("/")[0] / "__init__.py", GEN / package / "__init__.py"):
        assert init.exists(), f"{init} is missing: run `make proto`"
