"""core/identity.py: what a caller of each role may act on."""

from __future__ import annotations

from metald.core.identity import Caller, Role, customer


def test_a_customer_acts_on_its_own_vms_only() -> None:
    alice = customer("alice")
    assert alice.actor == "token:alice" and alice.role is Role.CUSTOMER
    assert alice.may_act_on("alice")
    assert not alice.may_act_on("bob")
    assert not alice.is_operator


def test_operators_and_admins_act_on_every_customers_vms() -> None:
    for role in (Role.OPERATOR, Role.ADMIN):
        ops = Caller(actor="key:k1", role=role, customer_id=None)
        assert ops.is_operator
        assert ops.may_act_on("alice") and ops.may_act_on("bob")
