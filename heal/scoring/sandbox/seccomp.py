"""The seccomp filter of the code sandbox: system calls a scored program never needs, refused.

A classic-BPF program (``struct sock_filter[]``) that bubblewrap loads (``--seccomp FD``) right
before it runs the sandboxed interpreter. On x86-64 it refuses with ``EPERM``:

* ``socket`` for every family but ``AF_UNIX`` (no inet / inet6 / netlink / packet sockets;
  ``socketpair``, which ``asyncio`` needs, stays);
* new namespaces and changing them: ``unshare``, ``setns``, ``clone`` with any ``CLONE_NEW*`` flag,
  and ``clone3`` (``ENOSYS``: its flags sit in memory a filter cannot read; glibc then falls back
  to ``clone``);
* other processes: ``ptrace``, ``process_vm_readv`` / ``writev``, ``pidfd_open``,
  ``pidfd_send_signal``, ``pidfd_getfd``, ``kcmp``;
* ``mknod`` / ``mknodat``; mounts (``mount``, ``umount2``, ``pivot_root``, ``chroot``, the new mount
  API); ``bpf``, ``perf_event_open``, ``userfaultfd``, ``io_uring_*``; kernel keys, modules,
  ``kexec``, ``reboot``, ``swapon`` / ``swapoff``, ``acct``, clocks, ``open_by_handle_at``.

Calls of another ABI (i386 through ``int 0x80``, x32) kill the process, so the numbers above
cannot be dodged. Other architectures get no filter (:func:`seccomp_filter` returns None and
:func:`heal.scoring.sandbox.isolation_status` says so); namespaces and the audit hook still apply.
"""

from __future__ import annotations

import platform
import struct
from typing import Dict, List, Optional, Tuple, Union

__all__ = ["seccomp_filter", "BLOCKED_X86_64"]

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000

RET_ALLOW = 0x7FFF0000
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
EPERM, ENOSYS = 1, 38
AF_UNIX = 1
CLONE_NEW_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                   | 0x00000080)  # NEWNS NEWCGROUP NEWUTS NEWIPC NEWUSER NEWPID NEWNET NEWTIME

# x86-64 system call numbers refused with EPERM
BLOCKED_X86_64: Dict[str, int] = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312,
    "pidfd_open": 434, "pidfd_send_signal": 424, "pidfd_getfd": 438,
    "mknod": 133, "mknodat": 259,
    "unshare": 272, "setns": 308,
    "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "bpf": 321, "perf_event_open": 298, "userfaultfd": 323,
    "io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427,
    "keyctl": 250, "add_key": 248, "request_key": 249,
    "init_module": 175, "finit_module": 313, "delete_module": 176, "kexec_load": 246, "kexec_file_load": 320,
    "reboot": 169, "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179,
    "settimeofday": 164, "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "syslog": 103, "ioperm": 173, "iopl": 172,
}
SOCKET, CLONE, CLONE3 = 41, 56, 435

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
        (JEQ_K, "clone", 0, CLONE),
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
        (JSET_K, "eperm", "allow", CLONE_NEW_FLAGS),
        "allow",
        (RET_K, 0, 0, RET_ALLOW),
        "eperm",
        (RET_K, 0, 0, RET_ERRNO | EPERM),
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
