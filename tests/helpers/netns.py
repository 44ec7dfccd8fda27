"""A network namespace joined to the host by a veth pair, for real network partitions in tests.

    ns = NetNamespace()           # needs root and iproute2 (`ip`); the CI runs as root
    ns.inside                     # the namespace's address (10.R.S.2): a process in it listens there
    ns.host                       # the host's address on the link (10.R.S.1): what the namespace sees of us
    ns.service                    # a second host address (10.R.S.9) for a service the test will cut off
    ns.argv(["python", ...])      # run a command inside the namespace (ip netns exec)
    ns.cut(ns.service)            # a blackhole route inside the namespace: packets to it vanish
    ns.heal(ns.service)           # the route back
    ns.close()

The cut drops packets silently (no reset, no ICMP), as a real partition does: open connections hang
until their peers' timeouts, new ones get nowhere. Traffic with `ns.host` (a frontend reaching an
engine inside) goes on. A service bound to `ns.service` must be started after the namespace exists.
Unix sockets and files (/tmp, /dev/shm) are shared with the namespace, only the network is its own.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess


def available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not shutil.which("ip"):
        return "`ip` (iproute2) is not installed"
    return None


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


class NetNamespace:
    def __init__(self):
        why = available()
        if why:
            raise RuntimeError(why)
        tag = f"{os.getpid() % 100000}{random.randrange(100)}"
        self.name = f"us-test-{tag}"
        self.veth_host, self.veth_ns = f"ush{tag}"[:15], f"usn{tag}"[:15]
        net = f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}"
        self.host, self.inside, self.service = f"{net}.1", f"{net}.2", f"{net}.9"
        self._cut: set[str] = set()
        _ip("netns", "add", self.name)
        try:
            _ip("link", "add", self.veth_host, "type", "veth", "peer", "name", self.veth_ns)
            _ip("link", "set", self.veth_ns, "netns", self.name)
            _ip("addr", "add", f"{self.host}/24", "dev", self.veth_host)  # the primary: our source address
            _ip("addr", "add", f"{self.service}/24", "dev", self.veth_host)
            _ip("link", "set", self.veth_host, "up")
            _ip("-n", self.name, "addr", "add", f"{self.inside}/24", "dev", self.veth_ns)
            _ip("-n", self.name, "link", "set", self.veth_ns, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def cut(self, address: str) -> None:
        _ip("-n", self.name, "route", "add", "blackhole", f"{address}/32")
        self._cut.add(address)

    def heal(self, address: str) -> None:
        _ip("-n", self.name, "route", "del", "blackhole", f"{address}/32")
        self._cut.discard(address)

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.veth_host], capture_output=True)  # takes its peer along
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
