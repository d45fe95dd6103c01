"""Generated code must match proto/: regenerate into a temp dir and compare."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GEN = ROOT / "src" / "metald" / "gen"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
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
            "vmprovisioner/v1/vm.proto",
        ],
        check=True,
    )
    for name in ("vm_pb2.py", "vm_pb2.pyi", "vm_connect.py"):
        fresh = (tmp_path / "vmprovisioner" / "v1" / name).read_text()
        committed = (GEN / "vmprovisioner" / "v1" / name).read_text()
        assert fresh == committed, f"{name} is stale: run `make proto`"
