"""api/codecs.py: the JSON codec writes the same JSON as connectrpc's, without whitespace,
and reads what it reads (unknown fields ignored)."""

from __future__ import annotations

import json

from connectrpc.compat import google_protobuf_json_codec

from metald.api.codecs import CompactJsonCodec, api_codecs
from metald.gen.vmprovisioner.v1 import vm_pb2 as pb


def _answer() -> pb.GetVmInfoResponse:
    answer = pb.GetVmInfoResponse(vm_id="vm-1", state=pb.VM_STATE_RUNNING)
    answer.config.cpu.vcpu_count = 2
    answer.metrics.memory_usage_bytes = 1 << 40  # int64: a JSON string
    answer.backend_info["backend"] = "qemu"
    return answer


def test_the_json_is_the_same_without_whitespace() -> None:
    compact = CompactJsonCodec().encode(_answer())
    usual = google_protobuf_json_codec().encode(_answer())
    assert json.loads(compact) == json.loads(usual)
    assert len(compact) < len(usual) and b"\n" not in compact


def test_it_decodes_and_ignores_unknown_fields() -> None:
    codec = CompactJsonCodec()
    back = codec.decode(codec.encode(_answer()), pb.GetVmInfoResponse)
    assert back == _answer()
    request = codec.decode(b'{"vmId": "vm-2", "notAField": 1}', pb.GetVmInfoRequest)
    assert request.vm_id == "vm-2"


def test_the_api_serves_binary_and_json() -> None:
    assert [c.name() for c in api_codecs()] == ["proto", "json"]
