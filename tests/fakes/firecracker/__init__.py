"""A Firecracker stand-in: the `firecracker` binary's HTTP API, strictly by the spec, with the
guest run under QEMU (see standin/__init__.py). Test code only."""
