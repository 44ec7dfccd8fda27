"""Tensor-parallel groups across nodes: `serve --tensor-parallel N --nnodes K --node-rank r --master-addr A
--master-port P` on each of K nodes (torchrun's spelling).

Each node runs N/K ranks on its devices --device .. --device + N/K - 1, each with that device's memory
service, publishing or importing its own shard. Node 0 runs the leader (rank 0: HTTP, scheduling, sampling,
the failover lock) and its node's workers exactly as a group on one node does (parallel/group.py). On a
node r > 0, `serve` is the group's *member* there: it starts ranks r*N/K .. (r+1)*N/K - 1 and waits; it
serves no HTTP and takes no lock.

Rendezvous: the leader hosts the group's TCP store at A:P (torch.distributed's rendezvous for the
collectives) and writes there where its control listener is; a member's ranks read that, connect and answer
a challenge with the group token (UNDERSTUDY_GROUP_TOKEN, the same on every node; HMAC-SHA256) before
anything on the connection is unpickled. From then on a remote rank is a worker like any other: the same
Channel, the same messages (parallel/rank.py). Like torch.distributed, a group trusts its network for the
store and the collectives: run groups across nodes on a private network.

Failure: the group still ends as a whole.
  a rank on another node dies   its connection closes (its kernel sends the FIN), the leader hears it as
                                fast as a local rank's hang-up, kills its own workers, closes the remote
                                ranks' connections and exits (4); the standby group on the same nodes
                                takes over (only its leader waited on the lock, on node 0)
  the leader dies               every remote rank reads EOF and exits; the member sees a rank exit,
                                kills the rest and exits (4)
  a node vanishes (no FIN)      TCP keepalive notices within ~5 s (comm.keep_alive), then as above
`understudy up --nnodes K --node-rank r` on each node restarts its part of every group slot that ended, so
a new standby group forms across the nodes (node/supervisor.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
import time

from understudy.engine.parallel.comm import Channel, keep_alive, pdeathsig_kill
from understudy.engine.serve_config import ServeConfig
from understudy.failover import exit_codes
from understudy.fds import lift_socket
from understudy.logs import log

logger = logging.getLogger("understudy.engine.parallel.nodes")

CONTROL_KEY = "understudy/control"  # in the group's store: host:port of the leader's control listener
TOKEN_ENV = "UNDERSTUDY_GROUP_TOKEN"
MAX_HELLO = 4096


def _token() -> bytes:
    return os.environ.get(TOKEN_ENV, "").encode()


def _mac(nonce: bytes) -> str:
    return hmac.new(_token(), nonce, hashlib.sha256).hexdigest()


def ranks_of_node(config: ServeConfig, node_rank: int) -> range:
    """The global ranks a node runs (node 0's start with the leader, rank 0)."""
    per_node = config.device.tensor_parallel // config.device.nnodes
    return range(node_rank * per_node, (node_rank + 1) * per_node)


# -- the leader's side -------------------------------------------------------------------------------------

class RemoteRanks:
    """The leader's control listener for the ranks of other nodes, advertised in the group's store."""

    def __init__(self, store, advertise_host: str):
        self.listener = socket.create_server(("", 0))  # every interface, any free port
        self.address = f"{advertise_host}:{self.listener.getsockname()[1]}"
        store.set(CONTROL_KEY, self.address)

    def accept(self, ranks: set[int], timeout: float) -> dict[int, tuple[Channel, int]]:
        """{rank: (channel, pid)} once every expected rank has connected and proved it holds the group token.
        A connection that does not is closed unread (nothing from it is unpickled)."""
        joined: dict[int, tuple[Channel, int]] = {}
        deadline = time.monotonic() + timeout
        try:
            while set(joined) != ranks:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"ranks {sorted(ranks - set(joined))} of other nodes did not join within "
                                       f"{timeout:.0f} s (are `serve --node-rank` members running with the same "
                                       f"--master-addr / --master-port and {TOKEN_ENV}?)")
                self.listener.settimeout(left)
                try:
                    conn, peer = self.listener.accept()
                except socket.timeout:
                    continue
                hello = _challenge(conn)
                rank = hello.get("rank") if hello else None
                if rank not in ranks or rank in joined:
                    log(logger, "tp_remote_rank_refused", logging.WARNING, peer=f"{peer[0]}:{peer[1]}",
                        reason="bad group token or hello" if hello is None else f"rank {rank} not expected")
                    conn.close()
                    continue
                joined[rank] = (Channel(lift_socket(keep_alive(conn))), int(hello["pid"]))
                log(logger, "tp_remote_rank_joined", rank=rank, pid=hello["pid"], node_rank=hello.get("node_rank"),
                    peer=f"{peer[0]}:{peer[1]}")
        finally:
            self.listener.close()
        return joined


def _challenge(conn: socket.socket) -> dict | None:
    """Send a nonce; the hello must carry HMAC(token, nonce). None for anything else (bounded, 10 s)."""
    nonce = secrets.token_bytes(16)
    conn.settimeout(10)
    try:
        conn.sendall(nonce)
        (n,) = struct.unpack("<I", _read(conn, 4))
        if n > MAX_HELLO:
            return None
        hello = json.loads(_read(conn, n))
        if not isinstance(hello, dict) or not hmac.compare_digest(str(hello.get("mac", "")), _mac(nonce)):
            return None
        if not isinstance(hello.get("rank"), int) or not isinstance(hello.get("pid"), int):
            return None
        conn.settimeout(None)
        return hello
    except (OSError, ValueError, struct.error):
        return None


def _read(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise OSError("closed")
        buf += chunk
    return buf


# -- a remote rank's side ----------------------------------------------------------------------------------

def connect_to_leader(store, rank: int, node_rank: int) -> Channel:
    """A remote rank: find the leader's control listener in the store, connect and say who we are."""
    host, port = store.get(CONTROL_KEY).decode().rsplit(":", 1)
    conn = socket.create_connection((host, int(port)), timeout=30)
    nonce = _read(conn, 16)
    hello = json.dumps({"rank": rank, "pid": os.getpid(), "node_rank": node_rank, "mac": _mac(nonce)}).encode()
    conn.sendall(struct.pack("<I", len(hello)) + hello)
    conn.settimeout(None)
    return Channel(lift_socket(keep_alive(conn)))


# -- the member: `serve --node-rank r` on a node r > 0 -----------------------------------------------------

def run_member(config: ServeConfig) -> int:
    """Start this node's ranks of the group and wait. When any of them exits (the group ended: a rank died,
    the leader died or left), the others are killed and the member exits 4, as a leader that lost a rank
    does; SIGTERM / SIGINT end this node's part of the group (and so the group) with exit 0."""
    d = config.device
    # What this node decides for itself; the rest of each rank's plan comes from the leader.
    local = {"device0": d.device, "socket_dir": d.socket_dir, "memory_service": d.memory_service}
    if config.model.model is not None:
        local["model"] = config.model.model  # where this node keeps the checkpoint
    procs: dict[int, subprocess.Popen] = {}
    for local_rank, rank in enumerate(ranks_of_node(config, d.node_rank)):
        cmd = [sys.executable, "-m", "understudy.engine.parallel.rank", "--join", f"{d.master_addr}:{d.master_port}",
               "--rank", str(rank), "--size", str(d.tensor_parallel), "--node-rank", str(d.node_rank),
               "--local-rank", str(local_rank), "--member-pid", str(os.getpid()), "--local-plan", json.dumps(local)]
        procs[rank] = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, preexec_fn=pdeathsig_kill)
    log(logger, "tp_node_started", node_rank=d.node_rank, nnodes=d.nnodes, ranks={r: p.pid for r, p in procs.items()},
        master=f"{d.master_addr}:{d.master_port}")
    stopping = False

    def kill_all() -> None:
        for p in procs.values():
            if p.poll() is None:
                p.kill()

    def stop(*_) -> None:
        nonlocal stopping
        stopping = True
        kill_all()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pid, status = os.wait()  # the first rank to exit ends this node's part of the group
    rank = next(r for r, p in procs.items() if p.pid == pid)
    kill_all()
    for p in procs.values():
        if p.pid != pid:
            p.wait()
    code = os.waitstatus_to_exitcode(status)
    log(logger, "tp_node_group_ended", logging.INFO if stopping else logging.WARNING, node_rank=d.node_rank,
        rank=rank, pid=pid, returncode=code)
    return 0 if stopping and code in (0, -signal.SIGKILL) else exit_codes.GROUP_LOST
