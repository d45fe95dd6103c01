"""The Firecracker backend: a driver of the shared VMM runtime (backends/vmm/) that configures
Firecracker over its HTTP API and reads its metrics FIFO. See driver.py."""
