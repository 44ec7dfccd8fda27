"""How a tensor-parallel group's processes talk: the collectives' rendezvous (torch.distributed over a
TCP store, on loopback for a group on one node), the control channel between the leader and each worker
(a socketpair on the leader's node, TCP to the ranks of other nodes: parallel/nodes.py), and `exit_now`,
the way every rank leaves."""

from __future__ import annotations

import os
import pickle
import select
import socket
import struct
import threading
from datetime import timedelta
from typing import NoReturn

import torch

from understudy.engine.model.sharding import TensorParallel
from understudy.failover import faults

# Collectives of a step finish in milliseconds; a peer that stopped answering is detected through its
# process (parallel/group.py) long before this. It only bounds a rank that hangs without dying.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def exit_now(code: int) -> NoReturn:
    """Leave the process at once, logs flushed, skipping the interpreter's teardown: a rank's peers may be
    gone already, and tearing down NCCL communicators (and CUDA graphs holding their kernels) whose peers
    are gone can block; the kernel releases our files, the failover lock and the memory sessions anyway
    (failover/faults.exit_now)."""
    faults.exit_now(code)


def pdeathsig_kill() -> None:
    """In a worker (preexec_fn): SIGKILL when the process that started it dies, however it dies (a rank cannot
    outlive its leader, or its node's member)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


LOOPBACK = "127.0.0.1"


def make_store(rank: int, size: int, port: int = 0, host: str = LOOPBACK, timeout: timedelta = COLLECTIVE_TIMEOUT):
    """The group's rendezvous: rank 0 hosts a TCP store (port 0: any free one, see `store.port`), the other
    ranks connect to it at `host` (the leader's node: --master-addr; loopback for a group on one node)."""
    import torch.distributed as dist

    if host == LOOPBACK:
        # All ranks of the group are on this host: talk over loopback (gloo otherwise resolves the host name,
        # which may name an interface the others cannot reach).
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return dist.TCPStore(host, port, world_size=size, is_master=rank == 0, timeout=timeout,
                         wait_for_workers=False)


def keep_alive(sock: socket.socket) -> socket.socket:
    """A control channel between nodes: a peer whose node vanished (no FIN ever comes) is noticed within
    ~5 s by TCP keepalive probes and the user timeout, and the group ends as for a dead rank."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 5000)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def join(store, rank: int, size: int, device: torch.device) -> TensorParallel:
    """init_process_group over `store` (blocks until every rank joined, on gloo)."""
    import torch.distributed as dist

    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(dist_backend(device), store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT, **kwargs)

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)

    def broadcast(t: torch.Tensor) -> None:
        dist.broadcast(t, src=0)

    return TensorParallel(rank, size, all_reduce, broadcast)


class Channel:
    """Length-prefixed pickled messages over one end of a socketpair (or, for a rank on another node, an
    authenticated TCP connection: parallel/nodes.py) between the leader and a worker.

    It carries each step's inputs (token ids, query / context lengths, block tables) and the few
    requests of a group's life (KV, park, adopt). Its other job is liveness: a worker whose leader is
    gone reads EOF and exits (on top of PR_SET_PDEATHSIG)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._send = threading.Lock()

    def send(self, msg) -> None:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send:
            self.sock.sendall(struct.pack("<Q", len(data)) + data)

    def recv(self):
        (n,) = struct.unpack("<Q", self._exactly(8))
        return pickle.loads(self._exactly(n))

    def _exactly(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:  # over TCP a peer killed with unread data resets instead of closing
                chunk = b""
            if not chunk:
                raise EOFError("the other end of the group's control channel closed")
            buf += chunk
        return bytes(buf)

    def closed(self, within: float) -> bool:
        """Whether the other end hangs up within `within` seconds (a failed collective: is the peer gone?)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)
        return bool(poller.poll(within * 1000))

    def wait_closed(self) -> None:
        """Block until the other end is closed (its process exited or died), reading nothing."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)  # POLLHUP, POLLERR, POLLNVAL come anyway
        while not poller.poll():
            pass

    def close(self) -> None:
        self.sock.close()
