#!/bin/sh
# metald default guest init: PID 1 of the initramfs made by `metald assets build`.
#
# CONTRACT (metald's backends and tests rely on it: change it only together with them; any
# edit here changes the recipe id, so the next `metald assets build` rebuilds the image):
#
# Kernel command line arguments honoured (all optional):
#   metald.vm_id=<id>             hostname, and echoed in the READY line
#   metald.on_shutdown=reboot     end the shutdown path with `reboot -f` instead of
#                                 `poweroff -f` (Firecracker exits on a guest reset, not a
#                                 power-off; use it there with reboot=k)
#   metald.ip4=<addr>/<prefix>    IPv4 address of the interface (eth0, or the one with metald.mac)
#   metald.gw4=<ip>               IPv4 default route
#   metald.ip6=<addr>/<prefix>    IPv6 address (duplicate address detection is turned off)
#   metald.gw6=<ip>               IPv6 default route
#   metald.dns=<ip>[,<ip>...]     name servers written to /etc/resolv.conf
#   metald.mac=<mac>              pick the interface with this MAC (else eth0)
#   metald.root=<device>          mount this ext4 device (e.g. /dev/vda) and switch_root into
#                                 it; the image there runs this same init
#   metald.agent=<tty>            a root shell reading commands from that serial port (e.g.
#                                 ttyS1), output back over it: the host runs commands in the
#                                 guest (tests). metald sets it only when its guest agent is
#                                 enabled; the port is wired to a socket only the host reaches
#
# Lines printed on the console (/dev/console; use console=ttyS0), each on its own line:
#   METALD-GUEST NET <ifname> ip4=<..> ip6=<..>       only when a network was configured
#   METALD-GUEST READY vm=<id> boot=<boot uuid> uptime=<s> root=<initramfs|device>
#                                 exactly once per boot, when up (after modules, network);
#                                 boot= differs on every boot (the kernel's random boot_id)
#   METALD-GUEST HEARTBEAT <seq>  every second after READY, seq = 1, 2, 3, ...
#                                 (a paused VM shows as missing lines)
#   METALD-GUEST SHUTDOWN         when the shutdown path starts; then sync and
#                                 `poweroff -f` (or `reboot -f`, see metald.on_shutdown)
#   METALD-GUEST ERROR <text>     something went wrong (a module, the network, the root)
#
# Ctrl-Alt-Del (QMP send-key ctrl-alt-delete, Firecracker SendCtrlAltDel), SIGINT and SIGTERM
# to PID 1 run the shutdown path. PID 1 reaps every zombie.

export PATH=/sbin:/bin:/usr/sbin:/usr/bin
umask 022
set -f

say() { echo "METALD-GUEST $*"; }

# The shutdown path is PID 1's trap before anything else runs: metald gives the kernel
# sysctl.kernel.ctrl-alt-del=0, so Ctrl-Alt-Del is a SIGINT to this shell from its first
# instruction, and a shell without the trap would exit on it (and the kernel panic).
HEARTBEAT_PID=""
ON_SHUTDOWN=""
shutdown_path() {
    trap '' INT TERM
    [ -n "$HEARTBEAT_PID" ] && kill "$HEARTBEAT_PID" 2>/dev/null
    say SHUTDOWN
    sync
    if [ -z "$ON_SHUTDOWN" ]; then  # asked before the command line was read
        [ -r /proc/cmdline ] || mount -t proc proc /proc
        case " $(cat /proc/cmdline) " in
            *" metald.on_shutdown=reboot "*) ON_SHUTDOWN=reboot ;;
        esac
    fi
    if [ "$ON_SHUTDOWN" = reboot ]; then
        reboot -f
    else
        poweroff -f
    fi
    # Not reached unless the kernel refused; keep PID 1 alive rather than panic.
    while :; do sleep 60; done
}
trap shutdown_path INT TERM
trap '' HUP QUIT USR1 USR2 PIPE

[ -d /proc/self ] || mount -t proc proc /proc
[ -d /sys/kernel ] || mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /run /tmp
grep -q " /dev/pts " /proc/mounts || mount -t devpts devpts /dev/pts 2>/dev/null

# Ctrl-Alt-Del: signal PID 1 (SIGINT) instead of resetting the machine (for kernels started
# without metald's sysctl argument).
echo 0 > /proc/sys/kernel/ctrl-alt-del

VM_ID=""
on_shutdown=poweroff
IP4="" GW4="" IP6="" GW6="" DNS="" MAC="" ROOT="" AGENT=""
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        metald.vm_id=*) VM_ID="${arg#*=}" ;;
        metald.on_shutdown=*) [ "${arg#*=}" = reboot ] && on_shutdown=reboot ;;
        metald.ip4=*) IP4="${arg#*=}" ;;
        metald.gw4=*) GW4="${arg#*=}" ;;
        metald.ip6=*) IP6="${arg#*=}" ;;
        metald.gw6=*) GW6="${arg#*=}" ;;
        metald.dns=*) DNS="${arg#*=}" ;;
        metald.mac=*) MAC="${arg#*=}" ;;
        metald.root=*) ROOT="${arg#*=}" ;;
        metald.agent=*) AGENT="${arg#*=}" ;;
    esac
done
ON_SHUTDOWN=$on_shutdown


# Modules, in dependency order (written by the builder). Already loaded ones are skipped, so
# this also works after switch_root into a root filesystem that carries the same image.
if [ -r /etc/metald/modules ]; then
    while read -r mod; do
        [ -n "$mod" ] || continue
        [ -d "/sys/module/$mod" ] && continue
        insmod "/lib/metald-modules/$mod.ko" || say ERROR "insmod $mod failed"
    done < /etc/metald/modules
fi

# A root filesystem: mount it and run this same init from it.
if [ -n "$ROOT" ] && [ ! -e /etc/metald/rootfs ]; then
    mkdir -p /newroot
    i=0
    while [ ! -b "$ROOT" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if mount -t ext4 -o rw "$ROOT" /newroot 2>/dev/null || mount -t ext4 -o ro "$ROOT" /newroot; then
        if [ -x /newroot/init ]; then
            for m in dev proc sys; do
                mkdir -p "/newroot/$m" 2>/dev/null
                mount --move "/$m" "/newroot/$m"
            done
            exec switch_root /newroot /init
            # Not reached unless switch_root failed: stay up without the root.
            say ERROR "switch_root to $ROOT failed"
        fi
        say ERROR "root $ROOT has no /init"
        umount /newroot
    else
        say ERROR "cannot mount root $ROOT"
    fi
fi

if [ -n "$VM_ID" ]; then
    hostname "$VM_ID" 2>/dev/null || say ERROR "cannot set hostname"
else
    hostname metald-guest
fi

ip link set lo up 2>/dev/null

if [ -n "$IP4$IP6" ]; then
    IFACE=eth0
    if [ -n "$MAC" ]; then
        want=$(echo "$MAC" | tr 'A-F' 'a-f')
        for d in /sys/class/net/*; do
            [ "$(cat "$d/address" 2>/dev/null)" = "$want" ] && IFACE="${d##*/}"
        done
    fi
    i=0
    while [ ! -e "/sys/class/net/$IFACE" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -e "/sys/class/net/$IFACE" ]; then
        [ -e "/proc/sys/net/ipv6/conf/$IFACE/accept_dad" ] \
            && echo 0 > "/proc/sys/net/ipv6/conf/$IFACE/accept_dad"
        ip link set "$IFACE" up || say ERROR "cannot bring $IFACE up"
        if [ -n "$IP4" ]; then
            ip addr add "$IP4" dev "$IFACE" || say ERROR "cannot add $IP4"
            [ -n "$GW4" ] && { ip route replace default via "$GW4" dev "$IFACE" || say ERROR "cannot route via $GW4"; }
        fi
        if [ -n "$IP6" ]; then
            ip -6 addr add "$IP6" dev "$IFACE" || say ERROR "cannot add $IP6"
            # replace, not add: a router advertisement (QEMU's user network sends them) may
            # have put a default route in first, and add then failed with "File exists"
            # (a race under load). The guest keeps taking RAs like any guest: the host's
            # filters keep a guest's RAs from its neighbours (tests/integration/test_guest_net.py)
            [ -n "$GW6" ] && { ip -6 route replace default via "$GW6" dev "$IFACE" || say ERROR "cannot route via $GW6"; }
        fi
        say NET "$IFACE" "ip4=${IP4:--}" "ip6=${IP6:--}"
    else
        say ERROR "no network interface $IFACE"
    fi
fi
if [ -n "$DNS" ]; then
    mkdir -p /etc
    : > /etc/resolv.conf
    for ns in $(echo "$DNS" | tr ',' ' '); do echo "nameserver $ns" >> /etc/resolv.conf; done
fi

agent() {
    trap - INT TERM
    while :; do
        # Non-interactive: an interactive busybox shell leaves when a background job ends.
        setsid sh -c 'stty -echo -onlcr clocal; sh 2>&1 </dev/'"$AGENT"' | cat' \
            </dev/"$AGENT" >/dev/"$AGENT" 2>&1
        sleep 0.5
    done
}
case "$AGENT" in
    ""|*/*|*..*) ;;
    *) if [ -c "/dev/$AGENT" ]; then agent & else say ERROR "no agent port /dev/$AGENT"; fi ;;
esac

read -r BOOT_ID < /proc/sys/kernel/random/boot_id
read -r UPTIME _ < /proc/uptime
if [ -e /etc/metald/rootfs ]; then ROOT_IS="${ROOT:-?}"; else ROOT_IS=initramfs; fi
say READY "vm=${VM_ID:--}" "boot=$BOOT_ID" "uptime=$UPTIME" "root=$ROOT_IS"

heartbeat() {
    trap - INT TERM
    n=0
    while :; do
        n=$((n + 1))
        say HEARTBEAT "$n"
        sleep 1
    done
}
heartbeat &
HEARTBEAT_PID=$!

# PID 1: `wait` blocks while the heartbeat runs, reaps every child that exits (orphans
# included) and returns early when a trapped signal arrives, so the trap runs promptly.
while :; do
    wait
    if ! kill -0 "$HEARTBEAT_PID" 2>/dev/null; then
        # Without a running child `wait` would return at once: start the heartbeat again.
        heartbeat &
        HEARTBEAT_PID=$!
    fi
done
