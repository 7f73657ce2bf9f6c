"""Hostile programs for the code sandbox, and how to see what they left behind.

Used by tests/test_sandbox.py and benchmarks/code_sandbox.py. Each program is a template: ``{marker}``
is a string unique to the run (a process meant to outlive the run carries it on its command line, a
file written outside the sandbox in its name), ``{port}`` a loopback port the caller listens on,
``{targets}`` the paths outside the sandbox to write to.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path

from winnow.rewards.sandbox import Limits

LIMITS = Limits(timeout_s=2.0, memory_mb=256, max_processes=8, file_size_mb=1, max_output_bytes=1 << 16)

# a process that sleeps long, findable by the marker on its command line
_SLEEPER = 'os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(120)", "{marker}"])'

HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": ("import os, sys\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"),
    "memory_bomb": "chunks = []\nwhile True:\n    chunks.append(bytearray(16 * 2**20))\n",
    "write_outside": (
        "for path in {targets}:\n"
        "    try:\n"
        "        with open(path, 'w') as f:\n"
        "            f.write('owned')\n"
        "        print('wrote', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.strerror)\n"
    ),
    "socket": (
        "import socket\n"
        "s = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        "s.sendall(b'{marker}')\n"
        "print('connected')\n"
    ),
    "env_secrets": (
        "import glob, os\n"
        "print(dict(os.environ))\n"
        "for path in glob.glob('/proc/[0-9]*/environ'):\n"
        "    try:\n"
        "        print(path, open(path, 'rb').read())\n"
        "    except OSError:\n"
        "        pass\n"
    ),
    "daemon": (  # the classic double fork: the grandchild leaves the session and the process group
        "import os, sys\n"
        "r, w = os.pipe()  # close-on-exec: EOF once the sleeper runs\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        f"        {_SLEEPER}\n"
        "    os._exit(0)\n"
        "os.close(w)\n"
        "os.read(r, 1)\n"
        "print('parent done')\n"
    ),
    "orphan_child": (  # a child left running in the process group
        "import os, sys\n"
        "r, w = os.pipe()\n"
        "if os.fork() == 0:\n"
        f"    {_SLEEPER}\n"
        "os.close(w)\n"
        "os.read(r, 1)\n"
        "print('parent done')\n"
    ),
    "output_flood": "while True:\n    print('x' * 1000)\n",
    "big_file": "open('big', 'wb').write(b'x' * (8 * 2**20))\n",
}

# what ends each run: a limit it hits, or an exit code (the program's own verdict)
EXPECTED_LIMIT = {
    "infinite_loop": "timeout",
    "fork_bomb": "timeout",
    "memory_bomb": "memory",
    "output_flood": "output",
    "big_file": "file_size",
}


def new_marker() -> str:
    """A string unique to one hostile run."""
    return f"winnow-hostile-{uuid.uuid4().hex}"


def outside_targets(marker: str, extra: list[Path] = ()) -> list[str]:
    """Places outside the sandbox a program must not be able to leave a file in."""
    folders = ["/tmp", "/var/tmp", "/dev/shm", str(Path.home()), os.getcwd(), *map(str, extra)]
    return [str(Path(f) / marker) for f in folders]


def program(name: str, marker: str, port: int = 9, targets: list[str] = ()) -> str:
    """The hostile program ``name`` for one run."""
    return HOSTILE[name].format(marker=marker, port=port, targets=list(targets))


def processes_with(marker: str) -> list[int]:
    """Pids whose command line carries ``marker``."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry.name))
            except OSError:
                pass
    return found


def sandbox_folders() -> set[str]:
    """The sandbox's temporary folders that exist now."""
    return {p.name for p in Path(tempfile.gettempdir()).glob("winnow-sandbox-*")}
