"""The sandbox launcher: ``python -I -S _sandbox_launch.py CONFIG_JSON``, started by :mod:`winnow.rewards.sandbox`.

It is a script of its own, not a ``preexec_fn``, because creating namespaces and dropping privileges
between fork and exec is unsafe in a threaded parent. It imports only the standard library (it runs
with ``-I -S``). What it does:

1. With namespaces (root only): unshare the mount, network, PID and IPC namespaces and fork. The
   child is PID 1 of the new PID namespace: when it exits, the kernel kills every process still in
   it (a daemon that ``setsid()``-ed out of the process group included). The parent reports the
   child's PID, so a timeout can kill PID 1, and waits for it.
2. PID 1 (with namespaces) mounts a fresh /proc, makes every mount read-only, and mounts a
   size-capped tmpfs on /tmp (bound on /var/tmp and /dev/shm too): the only writable place, the
   working directory, gone with the namespace.
3. It forks the program: rlimits, the run's own uid (when root), no new privileges, exec.
4. It waits for the program. Without namespaces it is a child subreaper: it then kills and reaps
   every process the program left (daemons included: orphans are re-parented to it). It writes
   ``{"status": wait status, "cpu_s", "maxrss_kb"}`` (or ``{"error": ...}``) as one JSON line on the
   status descriptor, which the program never holds (also ``program_pid``, and ``init_pid``: PID 1's
   pid outside the namespace, for the caller to kill on a timeout).
"""

import ctypes
import json
import os
import re
import resource
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 8, 32, 4096, 16384
MS_PRIVATE = 1 << 18
# flags a read-only remount must repeat, or it would clear them (which a user namespace refuses)
KEPT = {
    "nosuid": MS_NOSUID,
    "nodev": MS_NODEV,
    "noexec": MS_NOEXEC,
    "noatime": 1024,
    "nodiratime": 2048,
    "relatime": 1 << 21,
}
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38

libc = ctypes.CDLL(None, use_errno=True)
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _bytes(text):
    return text.encode() if text is not None else None


def _mount(source, target: str, fstype, flags: int, data=None) -> None:
    _check(libc.mount(_bytes(source), _bytes(target), _bytes(fstype), flags, _bytes(data)), f"mount {target}")


def _mounts():
    """(mount point, options) of every mount in this mount namespace."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            yield point, fields[5].split(",")


def isolate_files(cfg: dict) -> None:
    """Fresh /proc, every mount read-only, a tmpfs working directory on /tmp, /var/tmp and /dev/shm."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing we mount leaks back to the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for point, options in list(_mounts()):
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
        for name in options:
            flags |= KEPT.get(name, 0)
        _mount(None, point, None, flags)
    owner = cfg["uid"] if cfg["uid"] is not None else 0
    _mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MS_NOSUID | MS_NODEV,
        f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700,uid={owner},gid={owner}",
    )
    for extra in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(extra):
            _mount("/tmp", extra, None, MS_BIND)


def start_program(cfg: dict, code: bytes, workdir: str, status: int) -> int:
    """Fork the program with its limits and identity; returns its pid."""
    uid = cfg["uid"]
    if uid is not None:
        os.chown(workdir, uid, uid)
    pid = os.fork()
    if pid:
        return pid
    try:
        os.chdir(workdir)
        for name, value in cfg["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (value[0], value[1]))
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(NO_NEW_PRIVS)")
        with open("main.py", "wb") as f:
            f.write(code)
        os.execv(cfg["python"], [cfg["python"], "-I", "main.py"])
    except BaseException as e:  # noqa: BLE001 - anything here is the sandbox failing, said on the status fd
        _say(status, {"error": f"starting the program: {e}"})
    os._exit(127)


def _say(status: int, message: dict) -> None:
    os.write(status, (json.dumps(message) + "\n").encode())


def _children() -> list[int]:
    me, found = os.getpid(), []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def reap_descendants() -> None:
    """Kill and reap every process the program left. As a child subreaper this launcher inherits each
    orphan, however it detached (``setsid()`` included), once its parent is dead."""
    while True:
        for pid in _children():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def supervise(cfg: dict, code: bytes, status: int) -> None:
    """Run the program, wait for it, clear what it left, report how it ended."""
    try:
        if cfg["namespaces"]:
            isolate_files(cfg)  # PID 1 of the namespace: the kernel clears what is left when it exits
        else:
            _check(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(CHILD_SUBREAPER)")
        pid = start_program(cfg, code, "/tmp" if cfg["namespaces"] else cfg["workdir"], status)
    except OSError as e:
        _say(status, {"error": f"sandbox setup: {e}"})
        os._exit(1)
    _say(status, {"program_pid": pid})
    _, wait_status, usage = os.wait4(pid, 0)
    if not cfg["namespaces"]:
        reap_descendants()
    _say(status, {"status": wait_status, "cpu_s": usage.ru_utime + usage.ru_stime, "maxrss_kb": usage.ru_maxrss})
    os._exit(0)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    status = cfg["status_fd"]
    os.set_inheritable(status, False)  # the program never gets it: what it says there is ours
    with open(cfg["program"], "rb") as f:
        code = f.read()
    if not cfg["namespaces"]:
        supervise(cfg, code, status)
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if cfg["network"] else CLONE_NEWNET)
    try:
        _check(libc.unshare(flags), "unshare")
    except OSError as e:
        _say(status, {"error": f"sandbox setup: {e}"})
        sys.exit(1)
    pid = os.fork()
    if pid == 0:
        libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # should this launcher be killed, PID 1 and its namespace go too
        supervise(cfg, code, status)
    _say(status, {"init_pid": pid})
    os.close(status)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
