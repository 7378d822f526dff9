"""A child process that does not outlive its parent: Linux's parent-death signal.

``exit_with_parent(parent_pid)``, called first thing in a child, asks the kernel to SIGKILL the child
when its parent goes (a parent killed with SIGKILL runs no clean-up of its own), and ends the child at
once if the parent is already gone. The kernel sends the signal when the *thread* that started the
child exits, so start such children from a thread that lives as long as they do. Elsewhere than
Linux it arms nothing and returns False; callers that talk over a pipe also end on its end of file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int) -> bool:
    """Arm the parent-death signal; True when armed. Exits the process if ``parent_pid`` is gone."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(0)
    return True
