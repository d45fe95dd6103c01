"""A caller's kernel arguments cannot override or shadow metald's, in any spelling.

Two readers of the command line are modelled here, and every argument the API accepts must
look harmless to both:
- the kernel (lib/cmdline.c next_arg and kernel/params.c parse_args): splits on its isspace,
  which in its Latin-1 table includes 0xA0 (so UTF-8's NBSP ends a word at its second byte),
  honours double quotes around a word or a value, treats `-` and `_` alike in names, and
  hands what follows `--` to init;
- the default guest's init: `for arg in $(cat /proc/cmdline)`, a shell split on space, tab
  and newline, matched with `metald.<key>=*`.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from metald.backends.vmm.cmdline import GuestBoot, kernel_cmdline_and_dropped
from metald.core.errors import InvalidArgument
from metald.core.guest import RESERVED_NAMES, kernel_arg_problem
from metald.core.models import LaunchSpec, VmConfig
from metald.core.validation import Limits, check_config

MIB = 1024 * 1024
LIMITS = Limits(max_vcpus=4, max_memory_bytes=8192 * MIB)
FIELD = "config.boot.kernel_args"

# The kernel's own parameters metald sets, and the ones the guest contract relies on.
KERNEL_RESERVED = {"console", "panic", "reboot", "init", "rdinit", "tsc_early_khz", "tsc"}
SYSCTL_RESERVED = {"kernel/ctrl-alt-del", "kernel/panic"}

# --- the kernel's reading -------------------------------------------------------------------

_KERNEL_SPACE = set(b" \t\n\v\f\r\xa0")  # lib/ctype.c: _S for 9-13, 32 and 160


def kernel_params(line: str) -> tuple[list[tuple[str, str | None]], bool]:
    """(name, value) pairs as parse_args sees them, and whether a `--` was met."""
    data = line.encode()
    params: list[tuple[str, str | None]] = []
    i = 0
    while True:
        while i < len(data) and data[i] in _KERNEL_SPACE:
            i += 1
        if i >= len(data):
            return params, False
        start = i
        in_quote = False
        quoted = data[i] == ord('"')
        if quoted:
            i += 1
            in_quote = True
        word_start = i
        equals = -1
        while i < len(data):
            if data[i] in _KERNEL_SPACE and not in_quote:
                break
            if equals < 0 and data[i] == ord("="):
                equals = i
            if data[i] == ord('"'):
                in_quote = not in_quote
            i += 1
        word = bytearray(data[word_start:i])
        if equals < 0:
            name, value = bytes(word), None
            if quoted and name.endswith(b'"'):
                name = name[:-1]
        else:
            rel = equals - word_start
            name, raw_value = bytes(word[:rel]), bytes(word[rel + 1 :])
            if raw_value.startswith(b'"'):
                raw_value = raw_value[1:]
                if raw_value.endswith(b'"'):
                    raw_value = raw_value[:-1]
            elif quoted and raw_value.endswith(b'"'):
                raw_value = raw_value[:-1]
            value = raw_value.decode(errors="replace")
        del start
        text = name.decode(errors="replace")
        if value is None and text == "--":
            return params, True
        params.append((text, value))


def kernel_name(name: str) -> str:
    return name.replace("-", "_")


def sysctl_path(name: str) -> str | None:
    """fs/proc/proc_sysctl.c: sysctl.<path> or sysctl/<path>, `.` as `/`."""
    if not name.startswith("sysctl") or len(name) < 7 or name[6] not in "./":
        return None
    return name[7:].replace(".", "/")


def kernel_harm(caller_args: str) -> str | None:
    """What a line of caller arguments would take over, as the kernel reads it."""
    params, dashes = kernel_params(caller_args)
    if dashes:
        return "--"
    for name, _ in params:
        if kernel_name(name) in {kernel_name(r) for r in KERNEL_RESERVED}:
            return name
        path = sysctl_path(name)
        if path is not None and path.replace("_", "-") in SYSCTL_RESERVED:
            return name
        if name.startswith("metald"):
            return name
    return None


# --- the guest init's reading ---------------------------------------------------------------


def init_harm(caller_args: str) -> str | None:
    """A word the init's `case $arg in metald.*=*)` would take, or one it could glob."""
    for word in caller_args.replace("\t", " ").replace("\n", " ").split(" "):
        if word.startswith("metald.") or any(c in word for c in "*?["):
            return word
    return None


def accepted(kernel_args: str) -> bool:
    try:
        check_config(VmConfig(kernel_args=kernel_args), LIMITS)
    except InvalidArgument as e:
        assert e.field == FIELD
        return False
    return True


# --- fixed spellings ------------------------------------------------------------------------

SPELLINGS = [
    "init=/bin/sh",
    "rdinit=/bin/sh",
    "console=tty0",
    "panic=0",
    "reboot=w",
    "tsc=unstable",
    "tsc_early_khz=1",
    "tsc-early-khz=1",
    "TSC_EARLY_KHZ=1",
    "INIT=/bin/sh",
    "Init=/bin/sh",
    "r-d-init=/x",
    "rd_init=/x",
    "rd-init=/x",
    '"init"=/bin/sh',
    '"init=/bin/sh"',
    "'init'=/bin/sh",
    "'init=/bin/sh'",
    'foo="a init=/bin/sh"',
    "foo='a init=/bin/sh'",
    'foo="x metald.vm_id=evil"',
    "x\tinit=/bin/sh",
    "x\ninit=/bin/sh",
    "x\rinit=/bin/sh",
    "x\vinit=/bin/sh",
    "x\finit=/bin/sh",
    "x\u00a0init=/bin/sh",
    "x\u2003init=/bin/sh",
    "x\u3000init=/bin/sh",
    "x\u2028init=/bin/sh",
    "x\u0085init=/bin/sh",
    "\u0131nit=/bin/sh",  # dotless i, upper-cases to I
    "\uff49\uff4e\uff49\uff54=/bin/sh",  # fullwidth
    "init\u200b=/bin/sh",  # zero-width space
    "console\x00=x",
    "--",
    "-- init=/bin/sh",
    "---",
    '"--"',
    "metald.vm_id=other",
    "METALD.vm_id=other",
    "Metald.Vm_Id=other",
    "metald-vm_id=other",
    "metald_vm_id=other",
    "metald/vm_id=other",
    "metald.ip4=10.0.0.9/24",
    "metald.agent=ttyS0",
    "metald.root=/dev/vdb",
    "metald",
    "sysctl.kernel.ctrl-alt-del=1",
    "sysctl.kernel.ctrl_alt_del=1",
    "sysctl/kernel/ctrl-alt-del=1",
    "SYSCTL.KERNEL.CTRL-ALT-DEL=1",
    "sysctl.kernel.panic=0",
    "sysctl/kernel/panic=0",
    "foo=*",
    "foo=/bin/metald.*",
    "foo=$(reboot)",
    "foo=`reboot`",
    "foo=a\\ init=/x",
]


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_every_spelling_of_a_reserved_argument_is_refused(spelling: str) -> None:
    for args in (spelling, f"quiet {spelling}", f"{spelling} loglevel=3"):
        with pytest.raises(InvalidArgument) as err:
            check_config(VmConfig(kernel_args=args), LIMITS)
        assert err.value.field == FIELD


@pytest.mark.parametrize(
    "args",
    [
        "",
        "quiet",
        "loglevel=7",
        "quiet loglevel=3 8250.nr_uarts=2",
        "root=/dev/vda ro",
        "sysctl.vm.swappiness=10 sysctl/net/ipv4/ip_forward=1",
        "foo=a,b:c@d+e%f",
        "initcall_debug",  # not init=: a name of its own
        "consoleblank=0",
        "single",
        "   quiet   loglevel=3  ",
    ],
)
def test_plain_arguments_pass(args: str) -> None:
    check_config(VmConfig(kernel_args=args), LIMITS)


def test_the_refusal_names_the_argument_and_the_rule() -> None:
    with pytest.raises(InvalidArgument, match=r"Init is set by metald \(in any spelling\)"):
        check_config(VmConfig(kernel_args="quiet Init=/bin/sh"), LIMITS)
    with pytest.raises(InvalidArgument, match="separated by ASCII spaces"):
        check_config(VmConfig(kernel_args="quiet\tfoo=1"), LIMITS)
    with pytest.raises(InvalidArgument, match="no quotes"):
        check_config(VmConfig(kernel_args='"foo"=1'), LIMITS)


# --- properties -----------------------------------------------------------------------------

FRAGMENTS = [
    "init",
    "INIT",
    "rd",
    "console",
    "Console",
    "panic",
    "reboot",
    "tsc",
    "_early_khz",
    "metald",
    "METALD",
    "vm_id",
    "sysctl",
    "kernel",
    "ctrl-alt-del",
    ".",
    "-",
    "_",
    "/",
    "=",
    '"',
    "'",
    " ",
    "  ",
    "\t",
    "\n",
    "\u00a0",
    "\u2003",
    "--",
    "x",
    "/bin/sh",
    "*",
    "é",
    "\x00",
    "\\",
]
caller_args = st.lists(
    st.sampled_from(FRAGMENTS) | st.text(max_size=3), min_size=1, max_size=12
).map("".join)


@settings(max_examples=1000)
@given(caller_args)
@example('"init"=/bin/sh')
@example('"init=/bin/sh"')
@example('x="a metald.vm_id=b"')
@example("x\u00a0init=/bin/sh")
@example("console-=x")
def test_what_the_api_accepts_the_kernel_and_the_init_read_as_harmless(args: str) -> None:
    if not accepted(args):
        return
    assert kernel_harm(args) is None, args
    assert init_harm(args) is None, args
    # Whole line: metald's values of its own parameters are the ones that hold.
    spec = LaunchSpec(
        vm_id="vm-1",
        vcpu_count=1,
        memory_bytes=256 * MIB,
        kernel=__import__("pathlib").Path("/k"),
        initrd=None,
        kernel_args=args,
        disks=(),
    )
    line, dropped = kernel_cmdline_and_dropped(spec, GuestBoot(tsc_khz=1000))
    assert dropped == []
    params, dashes = kernel_params(line)
    assert not dashes
    last = {kernel_name(n): v for n, v in params}
    assert last["console"] == "ttyS0" and last["panic"] == "-1" and last["reboot"] == "t"
    assert "init" not in last and "rdinit" not in last
    assert [v for n, v in params if n.startswith("metald")] == ["vm-1"]


@given(st.sampled_from(sorted(RESERVED_NAMES)), st.data())
def test_any_case_and_separator_spelling_of_a_reserved_name_is_refused(
    name: str, data: st.DataObject
) -> None:
    spelled = "".join(
        data.draw(st.sampled_from(["-", "_", ".", "/", ""]))
        if c in "-_./"
        else data.draw(st.sampled_from([c.lower(), c.upper()]))
        for c in name
    )
    value = data.draw(st.sampled_from(["", "=", "=1", "=/bin/sh"]))
    assert kernel_arg_problem(spelled + value) is not None
    assert not accepted(f"quiet {spelled}{value}")


def test_a_saved_spec_with_a_reserved_argument_reaches_no_guest() -> None:
    """A row from before the rule: the backend leaves out every caller argument."""
    spec = LaunchSpec(
        vm_id="vm-1",
        vcpu_count=1,
        memory_bytes=256 * MIB,
        kernel=__import__("pathlib").Path("/k"),
        initrd=None,
        kernel_args="quiet init=/bin/sh loglevel=3",
        disks=(),
    )
    line, dropped = kernel_cmdline_and_dropped(spec, GuestBoot())
    assert "init=" not in line and "loglevel" not in line
    assert dropped == ["quiet", "init=/bin/sh", "loglevel=3"]
    ok, dropped = kernel_cmdline_and_dropped(replace(spec, kernel_args="loglevel=3"), GuestBoot())
    assert ok.endswith(" loglevel=3") and dropped == []
