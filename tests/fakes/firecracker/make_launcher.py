"""The stand-in as a "firecracker binary" a test (or metald's jailer) can exec directly.

WHY: the jailer execs the VMM binary path itself, so the interpreter that has jsonschema and
PyYAML must be named in the file's own shebang; and inside a jail only the host paths that are
bind-mounted exist, so the launcher's needs are listed here for the driver's "extra jail
paths" setting. Name the launcher `firecracker`: the kernel gives a script's process the
script's name (comm), which is what the session leak check in tests/conftest.py looks for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from metald.backends.qemu.host_paths import qemu_host_paths
from metald.jailer.host import dynamic_binary_paths

HERE = Path(__file__).resolve().parent
STANDIN = HERE / "firecracker-api-standin"
sys.path.insert(0, str(HERE))
from standin.spec import DEFAULT_SPEC  # type: ignore[import-not-found]  # noqa: E402

SPEC = DEFAULT_SPEC
_IMPORTS = "import jsonschema, yaml, json, ctypes, fcntl, socketserver, http.server"


def write_launcher(dest: Path, python: Path, spec: Path = SPEC) -> Path:
    """Write an executable `dest` whose shebang is `python -I` and that runs the stand-in
    with `spec` (absolute paths only: it may run from any directory, in a jail)."""
    if not python.is_absolute():
        raise ValueError(f"the interpreter path must be absolute: {python}")
    dest.write_text(
        f"#!{python} -I\n"
        "# A Firecracker stand-in for tests (tests/fakes/firecracker); not Firecracker.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "from pathlib import Path\n"
        "from standin.main import main\n"
        f"sys.exit(main(sys.argv[1:], spec_path=Path({str(spec)!r})))\n"
    )
    dest.chmod(0o755)
    return dest


def standin_host_paths(python: Path, spec: Path = SPEC) -> list[str]:
    """Read-only host paths the launcher needs inside a jail: the interpreter (its venv's bin
    dir, pyvenv.cfg, the real binary, its libraries and stdlib), the venv's site-packages, the
    libraries of the extension modules the stand-in imports, QEMU (binary, libraries, data
    dir and what it links to), the stand-in's own directory and the spec file."""
    probe = (
        f"{_IMPORTS}\nimport sys, sysconfig\n"
        "print(sys.executable); print(sys.base_prefix)\n"
        "print(sysconfig.get_path('stdlib')); print(sysconfig.get_path('purelib'))\n"
        "print(sysconfig.get_path('platlib'))\n"
        "for m in list(sys.modules.values()):\n"
        "    f = getattr(m, '__file__', None) or ''\n"
        "    if f.endswith('.so'): print(f)\n"
    )
    out = subprocess.run(
        [str(python), "-I", "-c", probe], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    executable, _base, stdlib, purelib, platlib, *extensions = out
    # Every hop from the venv's `python` to the real binary: a bind-mounted venv bin dir
    # holds only the first link, and pyenv's bin/python3 is a link too.
    paths = [str(Path(python).parent), *_link_chain(str(python)), os.path.realpath(executable)]
    cfg = Path(python).parent.parent / "pyvenv.cfg"
    if cfg.exists():
        paths.append(str(cfg))
    paths += [*dynamic_binary_paths(os.path.realpath(executable)), stdlib, purelib, platlib]
    for ext in extensions:
        paths += dynamic_binary_paths(ext)[1:]  # the module itself is under site-packages
    paths += [*qemu_host_paths(), str(HERE), str(spec)]
    return list(dict.fromkeys(paths))


def _link_chain(path: str) -> list[str]:
    """`path` and, while it is a symlink, each path it leads to (absolute, not resolved)."""
    chain = [path]
    while os.path.islink(chain[-1]) and len(chain) < 40:
        link = os.readlink(chain[-1])
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), link)))
    return chain
