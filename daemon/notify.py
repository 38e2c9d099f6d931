"""sd_notify, in the few lines it takes: datagrams to $NOTIFY_SOCKET (no libsystemd)."""

from __future__ import annotations

import os
import socket


def notify(message: str) -> bool:
    """Send MESSAGE ("READY=1", "STATUS=...", ...) to systemd; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message.encode())
    except OSError:
        return False  # systemd gone or the socket odd: the daemon serves on regardless
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, if systemd asked for them."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or (os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid()))):
        return None
    return int(usec) / 2e6
