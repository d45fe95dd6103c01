"""The KVM probe firmware (kvm_probe.S), one copy for every backend that must know whether
KVM really works here: QEMU boots it with -bios under -accel kvm.

`/dev/kvm` existing, and even KVM_CREATE_VM succeeding, proves little: under broken nested
virtualisation a guest starts and then dies with "KVM internal error ... emulation failure"
(on cmpxchg16b, xrstor). The firmware enters long mode with paging and runs those instructions
before writing 0x2a to I/O port 0xf4.
"""

from __future__ import annotations

# Assembled kvm_probe.S, up to the end of its GDT; the rest of the 64 KiB image is `hlt`
# except the reset vector at 0xFFF0 (a near jump to offset 0).
_PROBE_CODE = bytes.fromhex(
    "fa2e660f0116d8010f20c06683c8010f22c066ea1a00ffff080066b810008ed88ec08ed0bc00800000bf0010"
    "000031c0b900180000f3abc7050010000003200000c7050020000003300000c7050820000003400000c70510"
    "20000003500000c705182000000360000031c989c8c1e0150d830000008904cd0030000089c8c1e80b8904cd"
    "043000004181f90008000075da0f20e00d200600000f22e0b8001000000f22d8b9800000c00f320d00010000"
    "0f300f20c00d000000800f22c0eac400ffff1800b8100000008ed88ed048c7c400800000b8010000000fa20f"
    "bae10d0f83c60000004189cf31c031d248bb887766554433221148b900ffeeddccbbaa99f0480fc70c250080"
    "00000f859b00000048391c25008000000f858d000000410fbae71a732f0f20e0480d000004000f22e031c9b8"
    "0300000031d20f01d1b80300000031d20fae2425009000000fae2c250090000041bc204e0000488b04250830"
    "000048350000200048890425083000000f013c25000020004489242510002000660f6f042500800000660fd4"
    "c0488b042510800000f0480fc70c250080000041ffcc75b6b02ae6f4f4ebfdb015e6f4f4ebfd8db400006690"
    "0000000000000000ffff0000009acf00ffff00000092cf00ffff0000009aaf001f00b801ffff"
)
_RESET_VECTOR = bytes.fromhex("e90d00")  # jmp 0x0000 (wraps within the 64 KiB segment)
_IMAGE_SIZE = 0x10000
# The firmware writes this to port 0xf4 when every test passed, and _PROBE_FAILED when the
# CPU (as KVM presents it) has no cmpxchg16b or it gave a wrong answer.
PROBE_EXIT_PORT = 0xF4
PROBE_SUCCESS_VALUE = 0x2A
_PROBE_FAILED = 0x15
# isa-debug-exit makes QEMU exit with (value << 1) | 1.
PROBE_SUCCESS_EXIT = (PROBE_SUCCESS_VALUE << 1) | 1


def probe_image() -> bytes:
    """The 64 KiB firmware image (QEMU wants a -bios size that is a multiple of 64 KiB)."""
    image = bytearray(b"\xf4" * _IMAGE_SIZE)
    image[: len(_PROBE_CODE)] = _PROBE_CODE
    image[0xFFF0 : 0xFFF0 + len(_RESET_VECTOR)] = _RESET_VECTOR
    return bytes(image)
