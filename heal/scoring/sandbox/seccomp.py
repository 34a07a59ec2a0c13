"""The seccomp filter of the code sandbox: system calls a scored program never needs, refused.

A classic-BPF program (``struct sock_filter[]``) that bubblewrap loads (``--seccomp FD``) right
before it runs the sandboxed interpreter (bubblewrap has already forked its init, pid 1 of the
sandbox, which gets the filter too). On x86-64 it refuses with ``EPERM``, grouped by why:

* **Processes and namespaces.** ``fork``, ``vfork`` and ``clone`` without ``CLONE_THREAD``: a run
  is one process (threads stay, bounded by ``RLIMIT_NPROC``), so that ``RLIMIT_AS`` bounds all of
  its memory and no process of it can outlive it; ``clone`` with any ``CLONE_NEW*`` flag,
  ``unshare``, ``setns``; ``clone3`` returns ``ENOSYS`` (its flags sit in memory a filter cannot
  read; glibc then falls back to ``clone``). (``execve`` stays: it replaces the one process.)
* **Other processes.** ``ptrace``, ``process_vm_readv`` / ``writev``, ``pidfd_open``,
  ``pidfd_send_signal``, ``pidfd_getfd``, ``kcmp``.
* **Network.** ``socket`` and ``socketpair`` for every family but ``AF_UNIX`` (no inet / inet6 /
  netlink / packet / vsock sockets reach the kernel's socket code; ``socketpair(AF_UNIX)``, which
  ``asyncio`` needs, stays).
* **Memory that ``RLIMIT_AS`` does not count, and host-global kernel budgets.** ``memfd_create``
  and ``memfd_secret``; SysV shared memory, message queues and semaphores (``shmget`` / ``shmat``
  / ``shmctl`` / ``shmdt``, ``msgget`` / ``msgsnd`` / ``msgrcv`` / ``msgctl``, ``semget`` / ``semop``
  / ``semtimedop`` / ``semctl``); POSIX message queues (``mq_*``); Linux AIO (``io_setup`` and the
  other ``io_*`` calls: the host's ``fs.aio-nr``); ``io_uring_*``; ``userfaultfd``; ``fallocate``
  (disk reserved without writing it); ``fcntl(F_SETPIPE_SZ)`` (larger pipe buffers).
* **Channels to concurrent runs and the host** (every run shares the read-only interpreter and
  standard library): ``flock``; ``fcntl`` record and OFD locks, leases and dnotify; ``inotify_*``
  and ``fanotify_*`` (a watch on the shared standard library sees other runs' and the host's
  opens). ``fcntl`` is an allowlist of commands: ``F_DUPFD``, ``F_GETFD``, ``F_SETFD``, ``F_GETFL``,
  ``F_SETFL``, ``F_DUPFD_CLOEXEC``, ``F_GETPIPE_SZ``, ``F_GET_SEALS`` (what CPython uses:
  ``os.dup``, ``os.set_blocking``, ``os.set_inheritable``, ...); every other command is ``EPERM``.
* **Kernel attack surface a program never needs.** ``modify_ldt``, ``personality``; ``mknod`` /
  ``mknodat``; mounts (``mount``, ``umount2``, ``pivot_root``, ``chroot``, the new mount API
  including ``open_tree_attr``); ``bpf``, ``perf_event_open``; kernel keys, modules, ``kexec``,
  ``reboot``, ``swapon`` / ``swapoff``, ``acct``, ``quotactl``, clocks, ``open_by_handle_at`` /
  ``name_to_handle_at``, ``syslog``, ``ioperm`` / ``iopl``.

Arguments are compared on their low 32 bits, which is what the kernel reads of them (``int`` /
``unsigned int`` parameters; ``clone``'s flags, for which the kernel also keeps only the low 32
bits). Everything else is allowed: this is a denylist (an allowlist of what CPython needs would be
tighter, at the cost of refusing some rarely used standard-library call).

Calls of another ABI (i386 through ``int 0x80``, x32) kill the process, so the numbers above
cannot be dodged. Other architectures get no filter (:func:`seccomp_filter` returns None and
:func:`heal.scoring.sandbox.isolation_status` says so); namespaces and the audit hook still apply.
"""

from __future__ import annotations

import platform
import struct
from typing import Dict, List, Optional, Tuple, Union

__all__ = ["seccomp_filter", "BLOCKED_X86_64", "FCNTL_ALLOWED"]

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
AF_UNIX = 1
CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                   | 0x00000080)  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET NEWTIME

# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) refused with EPERM whatever
# their arguments
BLOCKED_X86_64: Dict[str, int] = {
    # processes and namespaces
    "fork": 57, "vfork": 58, "unshare": 272, "setns": 308,
    # other processes
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    # memory RLIMIT_AS does not count; host-global kernel budgets
    "memfd_create": 319, "memfd_secret": 447,
    "shmget": 29, "shmat": 30, "shmctl": 31, "shmdt": 67,
    "semget": 64, "semop": 65, "semctl": 66, "semtimedop": 220,
    "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71,
    "mq_open": 240, "mq_unlink": 241, "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244,
    "mq_getsetattr": 245,
    "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
    "io_pgetevents": 333,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427, "userfaultfd": 323,
    "fallocate": 285,
    # channels to concurrent runs and the host
    "flock": 73,
    "inotify_init": 253, "inotify_add_watch": 254, "inotify_rm_watch": 255, "inotify_init1": 294,
    "fanotify_init": 300, "fanotify_mark": 301,
    # kernel attack surface
    "modify_ldt": 154, "personality": 135,
    "mknod": 133, "mknodat": 259,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442, "open_tree_attr": 467,
    "bpf": 321, "perf_event_open": 298,
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "syslog": 103, "ioperm": 173, "iopl": 172,
}
# calls whose arguments decide
SOCKET, SOCKETPAIR, CLONE, CLONE3, FCNTL = 41, 53, 56, 435, 72
CLONE_THREAD = 0x00010000
# fcntl commands allowed; every other one is refused
FCNTL_ALLOWED: Dict[str, int] = {
    "F_DUPFD": 0, "F_GETFD": 1, "F_SETFD": 2, "F_GETFL": 3, "F_SETFL": 4,
    "F_DUPFD_CLOEXEC": 1030, "F_GETPIPE_SZ": 1032, "F_GET_SEALS": 1034,
}

# classic BPF opcodes
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K

Insn = Tuple[int, Union[int, str], Union[int, str], int]


def _assemble(prog: List[Union[Insn, str]]) -> bytes:
    """Instructions with jump targets given as label names -> ``struct sock_filter`` bytes."""
    labels, insns = {}, []
    for item in prog:
        if isinstance(item, str):
            labels[item] = len(insns)
        else:
            insns.append(item)
    out = []
    for pc, (code, jt, jf, k) in enumerate(insns):
        jt = labels[jt] - pc - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - pc - 1 if isinstance(jf, str) else jf
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError("seccomp filter: jump out of range")
        out.append(struct.pack("<HBBI", code, jt, jf, k))
    return b"".join(out)


def _x86_64_filter() -> bytes:
    prog: List[Union[Insn, str]] = [
        (LD_W_ABS, 0, 0, 4),  # arch
        (JEQ_K, 0, "kill", AUDIT_ARCH_X86_64),
        (LD_W_ABS, 0, 0, 0),  # syscall number
        (JGE_K, "kill", 0, X32_SYSCALL_BIT),
        (JEQ_K, "socket", 0, SOCKET),
        (JEQ_K, "socket", 0, SOCKETPAIR),
        (JEQ_K, "clone", 0, CLONE),
        (JEQ_K, "fcntl", 0, FCNTL),
        (JEQ_K, "enosys", 0, CLONE3),
    ]
    for nr in sorted(set(BLOCKED_X86_64.values())):
        prog.append((JEQ_K, "eperm", 0, nr))
    prog += [
        (RET_K, 0, 0, RET_ALLOW),
        "socket",
        (LD_W_ABS, 0, 0, 16),  # args[0] (low 32 bits): the address family
        (JEQ_K, "allow", "eperm", AF_UNIX),
        "clone",
        (LD_W_ABS, 0, 0, 16),  # args[0] (low 32 bits): the clone flags
        (JSET_K, "eperm", 0, CLONE_NEW_FLAGS),
        (JSET_K, "allow", "eperm", CLONE_THREAD),  # a thread (CLONE_THREAD implies CLONE_VM)
        "fcntl",
        (LD_W_ABS, 0, 0, 24),  # args[1] (low 32 bits): the command
    ]
    for cmd in sorted(set(FCNTL_ALLOWED.values())):
        prog.append((JEQ_K, "allow", 0, cmd))
    prog += [
        "eperm",
        (RET_K, 0, 0, RET_ERRNO | EPERM),
        "allow",
        (RET_K, 0, 0, RET_ALLOW),
        "enosys",
        (RET_K, 0, 0, RET_ERRNO | ENOSYS),
        "kill",
        (RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    return _assemble(prog)


def seccomp_filter() -> Optional[bytes]:
    """The filter for this machine's architecture, or None where we have none (not x86-64 Linux)."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64", "amd64"):
        return None
    return _x86_64_filter()
