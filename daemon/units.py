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


def unit(user: bool = False, exe: str = DEFAULT_EXE) -> str:
    return (USER if user else SYSTEM).format(exe=exe, shared=SHARED)
