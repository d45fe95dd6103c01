"""Hand-made Ethernet frames, and a tiny sender a guest runs to put them on its wire.

The default guest is busybox only: nothing there sends an arbitrary frame. ``sender_elf``
is a static x86-64 Linux program of a few hundred bytes, assembled here by hand (no
compiler needed): it reads ``<ifindex: 4 bytes little endian><frame>`` from its standard
input and sends the frame on an AF_PACKET raw socket out of that interface, exit status 0
if the kernel took it. The guest writes it from base64 and runs it as root (the guest's own
root: what a hostile tenant has).
"""

from __future__ import annotations

import ipaddress
import struct

BROADCAST = "ff:ff:ff:ff:ff:ff"
ALL_NODES_MAC = "33:33:00:00:00:01"
ETH_IP, ETH_ARP, ETH_IP6 = 0x0800, 0x0806, 0x86DD


def _mac(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def _sum16(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _checksum(data: bytes) -> int:
    return ~_sum16(data) & 0xFFFF


def ether(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload


def arp(src_mac: str, src_ip: str, target_ip: str, op: int = 2) -> bytes:
    """An ARP frame (a reply by default: "src_ip is at src_mac"), broadcast."""
    body = struct.pack("!HHBBH", 1, ETH_IP, 6, 4, op)
    body += _mac(src_mac) + ipaddress.IPv4Address(src_ip).packed
    body += bytes(6) + ipaddress.IPv4Address(target_ip).packed
    return ether(BROADCAST, src_mac, ETH_ARP, body)


def udp4(
    src_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes,
    dst_mac: str = BROADCAST,
) -> bytes:  # fmt: skip
    s, d = ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = s + d + struct.pack("!BBH", 0, 17, len(udp))
    udp = udp[:6] + struct.pack("!H", _checksum(pseudo + udp) or 0xFFFF) + udp[8:]
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0) + s + d
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return ether(dst_mac, src_mac, ETH_IP, header + udp)


def _ip6(src_mac: str, dst_mac: str, src: str, dst: str, nxt: int, hops: int, l4: bytes) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    header = struct.pack("!IHBB", 6 << 28, len(l4), nxt, hops) + s + d
    return ether(dst_mac, src_mac, ETH_IP6, header + l4)


def _l4_checksum6(src: str, dst: str, nxt: int, l4: bytes, at: int) -> bytes:
    s, d = ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed
    pseudo = s + d + struct.pack("!IxxxB", len(l4), nxt)
    value = _checksum(pseudo + l4)
    if nxt == 17:
        value = value or 0xFFFF
    return l4[:at] + struct.pack("!H", value) + l4[at + 2 :]


def udp6(
    src_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes,
    dst_mac: str = ALL_NODES_MAC,
) -> bytes:  # fmt: skip
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _ip6(src_mac, dst_mac, src, dst, 17, 64, _l4_checksum6(src, dst, 17, udp, 6))


def router_advertisement(src_mac: str, src: str, prefix: str, marker: bytes) -> bytes:
    """An RA to all nodes: "I am a default router; autoconfigure in `prefix`" (a /64),
    followed by an option carrying `marker` (type 253, experimental) so listeners can tell
    it apart."""
    net = ipaddress.IPv6Network(prefix)
    # type 134, code 0, checksum, hop limit 64, flags 0, router lifetime 1800 s,
    # reachable time 0, retrans timer 0
    ra = struct.pack("!BBHBBHII", 134, 0, 0, 64, 0, 1800, 0, 0)
    # Source link-layer address option.
    ra += struct.pack("!BB", 1, 1) + _mac(src_mac)
    # Prefix information: on-link and autonomous, valid 1 day, preferred 1 hour.
    ra += struct.pack("!BBBBIII", 3, 4, net.prefixlen, 0xC0, 86400, 3600, 0)
    ra += net.network_address.packed
    pad = (-(2 + len(marker))) % 8
    ra += struct.pack("!BB", 253, (2 + len(marker) + pad) // 8) + marker + bytes(pad)
    ra = _l4_checksum6(src, "ff02::1", 58, ra, 2)
    return _ip6(src_mac, ALL_NODES_MAC, src, "ff02::1", 58, 255, ra)


def neighbour_advertisement(src_mac: str, src: str, target: str, marker: bytes) -> bytes:
    """An unsolicited NA to all nodes: "target is at src_mac" (override), then a marker
    option."""
    na = struct.pack("!BBHI", 136, 0, 0, 0x20000000) + ipaddress.IPv6Address(target).packed
    na += struct.pack("!BB", 2, 1) + _mac(src_mac)
    pad = (-(2 + len(marker))) % 8
    na += struct.pack("!BB", 253, (2 + len(marker) + pad) // 8) + marker + bytes(pad)
    na = _l4_checksum6(src, "ff02::1", 58, na, 2)
    return _ip6(src_mac, ALL_NODES_MAC, src, "ff02::1", 58, 255, na)


# The sender ------------------------------------------------------------------------------

_BASE = 0x400000
_HEADERS = 64 + 56
_BUF_SIZE = 4096


def sender_elf() -> bytes:
    """The frame sender (see the module docstring) as an ELF executable."""
    code = bytearray()
    fixups: list[tuple[int, str, int]] = []  # (offset of rel32, symbol, addend)

    def emit(data: bytes) -> None:
        code.extend(data)

    def rip(prefix: bytes, symbol: str, addend: int = 0) -> None:
        """An instruction ending in a RIP-relative rel32 to symbol + addend."""
        code.extend(prefix)
        fixups.append((len(code), symbol, addend))
        code.extend(bytes(4))

    emit(b"\x31\xff")  # xor edi, edi              ; fd 0
    rip(b"\x48\x8d\x35", "buf")  # lea rsi, [rip+buf]
    emit(b"\xba" + struct.pack("<I", _BUF_SIZE))  # mov edx, BUF_SIZE
    emit(b"\x31\xc0")  # xor eax, eax             ; SYS_read
    emit(b"\x0f\x05")  # syscall
    emit(b"\x49\x89\xc4")  # mov r12, rax         ; bytes read
    emit(b"\xbf\x11\x00\x00\x00")  # mov edi, 17  ; AF_PACKET
    emit(b"\xbe\x03\x00\x00\x00")  # mov esi, 3   ; SOCK_RAW
    emit(b"\x31\xd2")  # xor edx, edx             ; protocol 0: send only
    emit(b"\xb8\x29\x00\x00\x00")  # mov eax, 41  ; SYS_socket
    emit(b"\x0f\x05")  # syscall
    emit(b"\x49\x89\xc5")  # mov r13, rax         ; the socket
    rip(b"\x4c\x8d\x05", "sll")  # lea r8, [rip+sll]
    emit(b"\x66\x41\xc7\x00\x11\x00")  # mov word [r8], 17   ; sll_family
    rip(b"\x8b\x05", "buf")  # mov eax, [rip+buf]  ; the ifindex
    emit(b"\x41\x89\x40\x04")  # mov [r8+4], eax   ; sll_ifindex
    emit(b"\x4c\x89\xef")  # mov rdi, r13
    rip(b"\x48\x8d\x35", "buf", 4)  # lea rsi, [rip+buf+4]  ; the frame
    emit(b"\x49\x8d\x54\x24\xfc")  # lea rdx, [r12-4]      ; its length
    emit(b"\x45\x31\xd2")  # xor r10d, r10d       ; flags
    emit(b"\x41\xb9\x14\x00\x00\x00")  # mov r9d, 20   ; sizeof(sockaddr_ll)
    emit(b"\xb8\x2c\x00\x00\x00")  # mov eax, 44  ; SYS_sendto
    emit(b"\x0f\x05")  # syscall
    emit(b"\x48\x89\xc7")  # mov rdi, rax
    emit(b"\x48\xc1\xef\x3f")  # shr rdi, 63      ; 1 if it failed
    emit(b"\xb8\x3c\x00\x00\x00")  # mov eax, 60  ; SYS_exit
    emit(b"\x0f\x05")  # syscall

    code_at = _BASE + _HEADERS
    end = code_at + len(code)
    symbols = {"sll": (end + 15) & ~15}
    symbols["buf"] = symbols["sll"] + 32
    for offset, symbol, addend in fixups:
        next_ip = code_at + offset + 4
        code[offset : offset + 4] = struct.pack("<i", symbols[symbol] + addend - next_ip)
    filesz = _HEADERS + len(code)
    memsz = symbols["buf"] + _BUF_SIZE - _BASE
    ehdr = (
        b"\x7fELF\x02\x01\x01" + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, code_at, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    )  # fmt: skip
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, _BASE, _BASE, filesz, memsz, 0x1000)
    return ehdr + phdr + bytes(code)


def sender_input(ifindex: int, frame: bytes) -> bytes:
    return struct.pack("<i", ifindex) + frame
