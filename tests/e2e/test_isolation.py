"""Tenants: one customer can neither see nor touch another's VM; without a valid token nothing
happens at all."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from metald.assets.store import LocalAssetStore

from ._support import (
    SERVICE,
    Caller,
    Daemon,
    curl_raw,
    pid_alive,
    state_name,
)

# Every RPC that names a VM, with the variants that would do the most harm.
PER_VM_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("GetVmInfo", {}),
    ("BootVm", {}),
    ("PauseVm", {}),
    ("ResumeVm", {}),
    ("RebootVm", {}),
    ("RebootVm", {"force": True}),
    ("ShutdownVm", {}),
    ("ShutdownVm", {"force": True}),
    ("DeleteVm", {}),
    ("DeleteVm", {"force": True}),
]


@pytest.mark.parametrize("client", ["curl-connect-json", "grpcio"])
def test_other_customer_cannot_see_or_touch(
    daemon: Daemon, callers: Callable[..., Caller], client: str
) -> None:
    alice = callers(client, daemon.url, "dev_customer_alice")
    bob = callers(client, daemon.url, "dev_customer_bob")

    a_vm = alice.must(
        "CreateVm", {"vm_id": f"first-{client[:4]}", "config": {"metadata": {"o": "a"}}}
    )
    a_id = a_vm.body["vm_id"]
    a_pid = int(alice.info(a_id).body["backend_info"]["pid"])
    b_id = bob.must("CreateVm", {}).body["vm_id"]
    before = daemon.snapshot()

    for method, extra in PER_VM_CALLS:
        reply = bob(method, {"vm_id": a_id, **extra})
        assert reply.code in ("not_found", "permission_denied"), (method, extra, reply)
        assert "alice" not in reply.message, f"{method}: the error reveals the owner: {reply!r}"

    # Nothing happened to Alice's VM: same row, same process, still CREATED.
    assert daemon.snapshot() == before
    assert pid_alive(a_pid)
    assert state_name(alice.info(a_id).body["state"]) == "CREATED"

    # Lists are per customer.
    b_list = bob.must("ListVms", {})
    assert [v["vm_id"] for v in b_list.body["vms"]] == [b_id]
    assert b_list.body["total_count"] == 1
    assert all(v["customer_id"] in ("bob", "") for v in b_list.body["vms"])
    for states in (["VM_STATE_CREATED"], ["VM_STATE_CREATED", "VM_STATE_RUNNING"]):
        filtered = bob.must("ListVms", {"state_filter": states, "page_size": 1000})
        assert a_id not in [v["vm_id"] for v in filtered.body["vms"]]
    a_list = alice.must("ListVms", {})
    assert [v["vm_id"] for v in a_list.body["vms"]] == [a_id]

    # An existing id cannot be taken over by another customer.
    clash = bob("CreateVm", {"vm_id": a_id})
    assert clash.code == "already_exists", clash
    assert daemon.db_rows()[a_id]["customer_id"] == "alice"

    for who, vm_id in ((alice, a_id), (bob, b_id)):
        who.must("DeleteVm", {"vm_id": vm_id})
    assert not daemon.qemu_pids()


def test_customer_id_must_be_the_callers(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    alice = callers("curl-connect-json", daemon.url, "dev_customer_alice")
    before = daemon.snapshot()
    denied = alice("CreateVm", {"customer_id": "bob"})
    assert denied.code == "permission_denied", denied
    denied = callers("grpcio", daemon.url, "dev_customer_alice")(
        "CreateVm", {"customer_id": "mallory"}
    )
    assert denied.code == "permission_denied", denied
    assert daemon.snapshot() == before

    own = alice.must("CreateVm", {"customer_id": "alice"})
    vm_id = own.body["vm_id"]
    assert daemon.db_rows()[vm_id]["customer_id"] == "alice"
    alice.must("DeleteVm", {"vm_id": vm_id})


BAD_AUTHORIZATION = [
    None,  # no header at all
    "",
    "Bearer",
    "Bearer ",
    "Basic ZGV2X2N1c3RvbWVyX2FjbWU6",
    "dev_customer_acme",  # no scheme
    "Bearer dev_customer_",  # no customer id
    "Bearer dev_customer_a/b",
    "Bearer dev_customer_acme extra",
    "Bearer nonsense",
    "Bearer dev_customer_" + "a" * 300,
]


def test_unauthenticated(daemon: Daemon, callers: Callable[..., Caller]) -> None:
    owner = callers("curl-connect-json", daemon.url, "dev_customer_acme")
    vm_id = owner.must("CreateVm", {"vm_id": "authz-target"}).body["vm_id"]
    before = daemon.snapshot()

    requests = [
        ("ListVms", {}),
        ("CreateVm", {"vm_id": "should-not-exist"}),
        ("GetVmInfo", {"vm_id": vm_id}),
        ("DeleteVm", {"vm_id": vm_id, "force": True}),
        ("BootVm", {"vm_id": vm_id}),
    ]
    for header in BAD_AUTHORIZATION:
        headers = {"Content-Type": "application/json"}
        if header is not None:
            headers["Authorization"] = header
        for method, body in requests:
            status, text = curl_raw(
                f"{daemon.url}/{SERVICE}/{method}", json.dumps(body).encode(), headers
            )
            assert status == 401, (header, method, status, text)
            assert json.loads(text)["code"] == "unauthenticated", (header, method, text)

    g = callers("grpcio", daemon.url, None)
    # (Not "": "Bearer " ends in whitespace, which HTTP/2 forbids in a field value.)
    for token in (None, "nonsense", "dev_customer_", "dev_customer_a/b"):
        for method, body in requests:
            reply = g(method, body, token=token)
            assert reply.code == "unauthenticated", (token, method, reply)
    for protocol in ("buf-connect", "buf-grpc", "buf-grpcweb"):
        reply = callers(protocol, daemon.url, None)("CreateVm", {"vm_id": "should-not-exist"})
        assert reply.code == "unauthenticated", (protocol, reply)

    assert daemon.snapshot() == before, "an unauthenticated call changed something"
    owner.must("DeleteVm", {"vm_id": vm_id})


def test_dev_tokens_refused_when_dev_auth_is_off(
    metald_factory: Callable[..., Daemon], callers: Callable[..., Caller]
) -> None:
    strict = metald_factory(name="metald-strict", UNKEY_METALD_AUTH_DEV_TOKENS="false")
    for name in ("curl-connect-json", "grpcio", "buf-connect", "buf-grpc", "buf-grpcweb"):
        call = callers(name, strict.url, "dev_customer_acme")
        for method, body in (("ListVms", {}), ("CreateVm", {"vm_id": "nope"})):
            reply = call(method, body)
            assert reply.code == "unauthenticated", (name, method, reply)
    assert strict.db_rows() == {}
    assert not strict.qemu_pids()


def test_another_customers_asset_is_not_found(
    metald_factory: Callable[..., Daemon],
    private_store: Path,
    callers: Callable[..., Caller],
    tmp_path: Path,
) -> None:
    """An asset the operator gave to Bob (`metald assets owner`) cannot be attached by Alice:
    by id and by its blob's path the answer is not_found, in the same words as for an asset
    nobody has, and nothing is made. Bob attaches it; the default guest is everyone's."""
    store = LocalAssetStore(private_store)
    image = tmp_path / "bobs.img"
    image.write_bytes(b"bob's data" + bytes(1 << 16))
    bobs = store.add_file(image, "disk", "bob's disk", owner="bob")
    daemon = metald_factory(UNKEY_METALD_ASSETMANAGER_CACHE_DIR=str(private_store))
    alice = callers("curl-connect-json", daemon.url, "dev_customer_alice")
    bob = callers("curl-connect-json", daemon.url, "dev_customer_bob")

    def with_disk(path: str, vm_id: str) -> dict[str, Any]:
        disk = {"id": "data", "path": path, "read_only": True}
        return {"vm_id": vm_id, "config": {"storage": [disk]}}

    before = daemon.snapshot()
    blob_path = f"blobs/sha256/{bobs.sha256}"
    nobodys = {bobs.id: "sha256-0123456789abcdef", blob_path: "blobs/sha256/" + "0" * 64}
    for theirs, missing in nobodys.items():
        got = alice("CreateVm", with_disk(theirs, "a-steal"))
        none = alice("CreateVm", with_disk(missing, "a-steal"))
        assert got.code == none.code == "not_found", (got, none)
        assert got.message.replace(theirs, "X") == none.message.replace(missing, "X")
        assert "bob" not in got.message
    assert daemon.snapshot() == before

    b_id = bob.must("CreateVm", with_disk(bobs.id, "b-own")).body["vm_id"]
    a_id = alice.must("CreateVm", {"vm_id": "a-default"}).body["vm_id"]
    for who, vm_id in ((bob, b_id), (alice, a_id)):
        who.must("DeleteVm", {"vm_id": vm_id})
    assert not daemon.qemu_pids()
