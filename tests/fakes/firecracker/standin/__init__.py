"""firecracker-api-standin: behaves like the `firecracker` binary as far as its HTTP API goes.

WHY: Firecracker needs working KVM and cannot be installed on the development machines, yet
metald's Firecracker backend must be tested with real guests. This program serves Firecracker's
API on its Unix socket, validates every request against the official Swagger spec (the same
file the backend is written against), enforces Firecracker's ordering rules, and on
InstanceStart runs the configured guest under QEMU (microvm, TCG), so console, network, pause
and Ctrl-Alt-Del are real. It stands for a foreign binary: it never imports metald, and it
writes nothing outside its api socket's directory (it must run inside metald's jail).

Modules: spec (schemas from the YAML), vmm (the API's state machine), qemu (the guest),
metrics (metrics/log sinks and counters), server (HTTP over the socket, the main loop), main
(the command line).
"""
