"""systemd units for the daemon: the system service (a dedicated user, /var/lib/traind)
and the user service (`systemctl --user`, the default home). systemd/ holds them as
written for /usr/local/bin/traind; `traind systemd-unit` prints them for this install."""

from __future__ import annotations

SHARED = """Type=notify
NotifyAccess=main
WatchdogSec=60
Restart=on-failure
RestartSec=5
RestartPreventExitStatus=2
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec=15min
OOMPolicy=continue
"""

SYSTEM = """[Unit]
Description=traind: training jobs with crash-safe saves
After=local-fs.target

[Service]
ExecStart={exe} --home /var/lib/traind daemon
User=traind
Group=traind
StateDirectory=traind
StateDirectoryMode=0750
UMask=0027
{shared}NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes
# No PrivateDevices= and no DevicePolicy=: jobs must see /dev/nvidia*.

[Install]
WantedBy=multi-user.target
"""

USER = """[Unit]
Description=traind: training jobs with crash-safe saves (user service)

[Service]
ExecStart={exe} daemon
{shared}
[Install]
WantedBy=default.target
"""

DEFAULT_EXE = "/usr/local/bin/traind"
SYSTEM_HOME = "/var/lib/traind"


def _quoted(path: str) -> str:
    """PATH as one word of a unit file: % doubled (specifiers), quoted where it has spaces."""
    path = path.replace("%", "%%")
    if any(c in path for c in " \t\"'\\"):
        return '"' + path.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return path


def unit(user: bool = False, exe: str = DEFAULT_EXE, home: str | None = None) -> str:
    """The unit; HOME (absolute) serves that home instead of the default one. The system
    unit then lets the daemon write there (ProtectSystem=strict makes the rest read-only)
    instead of having systemd make /var/lib/traind."""
    text = (USER if user else SYSTEM).format(exe=exe, shared=SHARED)
    if home is None or (not user and home == SYSTEM_HOME):
        return text
    home = _quoted(home)
    if user:
        return text.replace(f"ExecStart={exe} daemon", f"ExecStart={exe} --home {home} daemon")
    return text.replace(f"--home {SYSTEM_HOME} daemon", f"--home {home} daemon").replace(
        "StateDirectory=traind\nStateDirectoryMode=0750\n", f"ReadWritePaths={home}\n")
