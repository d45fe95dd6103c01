import pytest

from metald.api import convert
from metald.core.errors import InvalidArgument
from metald.core.states import VmState
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb


def test_absent_cpu_and_memory_get_defaults() -> None:
    config = convert.config_from_pb(pb.VmConfig())
    assert config.vcpu_count == 1 and config.memory_bytes == 256 * 1024 * 1024


def test_present_but_zero_cpu_is_kept_for_validation_to_refuse() -> None:
    config = convert.config_from_pb(pb.VmConfig(cpu=pb.CpuConfig()))
    assert config.vcpu_count == 0


def test_config_round_trips() -> None:
    msg = pb.VmConfig(
        cpu=pb.CpuConfig(vcpu_count=2, max_vcpu_count=2),
        memory=pb.MemoryConfig(size_bytes=512 * 1024 * 1024),
        boot=pb.BootConfig(kernel_path="k", initrd_path="i", kernel_args="quiet"),
        storage=[pb.StorageDevice(id="root", path="d.img", read_only=True, is_root_device=True)],
        network=[pb.NetworkInterface(id="eth0", mode=pb.NETWORK_MODE_IPV4_ONLY)],
        console=pb.ConsoleConfig(enabled=True),
        metadata={"a": "b"},
    )
    assert convert.config_to_pb(convert.config_from_pb(msg)) == msg


def test_state_filter() -> None:
    assert convert.states_from_pb([pb.VM_STATE_RUNNING]) == [VmState.RUNNING]
    with pytest.raises(InvalidArgument, match="state_filter"):
        convert.states_from_pb([pb.VM_STATE_UNSPECIFIED])
