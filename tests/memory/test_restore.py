"""A memory service that dies and restarts gets its memory back from the clients that map it.

The server is SIGKILLed while clients map the weights and own the kv pool; a new server starts
on the same socket with empty pools; `MemoryClient.restore()` hands it the allocations the
client still maps (their fds travel with a Restore request), without anyone re-reading or
re-writing the bytes. Every refusal leaves the server's file-descriptor table as it was.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from understudy.memory import MemoryClient, MemoryServiceError, TensorMeta, read_status
from understudy.memory import protocol as p

from tests.helpers.procs import BACKEND, ServerProcess

MiB = 1 << 20
W_BYTES, KV_BYTES = 4 * MiB, 2 * MiB


def fill(client: MemoryClient, index: int, value: int) -> None:
    m = client.mappings[index]
    client.backend.tensor(m.va, m.size).fill_(value)


def total(client: MemoryClient, index: int) -> int:
    m = client.mappings[index]
    return int(client.backend.tensor(m.va, m.size).to(torch.int64).sum())


def server_fds(srv: ServerProcess) -> int:
    return len(os.listdir(f"/proc/{srv.pid}/fd"))


def wait_disconnects(srv: ServerProcess, n: int) -> None:
    """Until the server has seen n more connections end (and closed their sockets)."""
    for _ in range(n):
        srv.wait_event("disconnected")


def publish(path: Path, value: int, nbytes: int = W_BYTES, name: str = "w") -> tuple[MemoryClient, str]:
    """A writer that publishes one tensor filled with `value` and stays on as a reader."""
    w = MemoryClient(path, "weights", "rw", name="writer")
    w.allocate(nbytes)
    fill(w, 0, value)
    w.set_metadata({name: TensorMeta(0, 0, (nbytes,), (1,), "uint8")}, {"model": name})
    return w, w.commit()


def own_kv(path: Path, value: int) -> MemoryClient:
    kv = MemoryClient(path, "kv", "rw", name="kv-owner")
    kv.allocate(KV_BYTES)
    fill(kv, 0, value)
    kv.set_metadata(extra={"kv_spec": {"blocks": 7}})
    return kv


@pytest.fixture
def restarted(socket_dir):
    """(old server, a function that SIGKILLs it and starts the next one on the same socket)."""
    servers = [ServerProcess.start(BACKEND, socket_dir)]

    def restart() -> ServerProcess:
        assert servers[-1].kill(signal.SIGKILL) == -signal.SIGKILL
        servers.append(ServerProcess.start(BACKEND, socket_dir))
        return servers[-1]

    yield servers[0], restart
    for srv in servers:
        if srv.proc.poll() is None:
            srv.stop()


def test_restarted_server_takes_weights_and_kv_back_from_their_mappings(restarted):
    old, restart = restarted
    writer, digest = publish(old.path, 7)
    reader = MemoryClient(old.path, "weights", "ro", name="reader")
    reader.map_all()
    kv = own_kv(old.path, 3)
    before = reader.tensor("w")

    new = restart()
    status = read_status(new.path)
    assert status["pools"]["weights"]["state"] == "EMPTY" and status["pools"]["kv"]["state"] == "EMPTY"

    assert reader.restore() is True  # the first one back gives the pool its layout
    assert writer.restore() is False  # the second finds the same layout and just reads it
    assert kv.restore() is True
    status = read_status(new.path)
    weights, pool_kv = status["pools"]["weights"], status["pools"]["kv"]
    assert (weights["state"], weights["committed_hash"], len(weights["readers"])) == ("RO", digest, 2)
    assert (pool_kv["state"], pool_kv["extra"]) == ("RW", {"kv_spec": {"blocks": 7}})
    assert status["bytes_in_use"] == W_BYTES + KV_BYTES
    assert [e["event"] for e in status["events"]].count("restored") == 2

    # Nobody wrote the bytes again: a newcomer reads what the first writer wrote, and the
    # tensors the clients had before the restart still work.
    with MemoryClient(new.path, "weights", "ro") as fresh:
        fresh.map_all()
        assert fresh.layout.hash == digest
        assert int(fresh.tensor("w").to(torch.int64).sum()) == 7 * W_BYTES
    assert int(before.to(torch.int64).sum()) == 7 * W_BYTES
    kv.close()  # the owner leaves: the next one adopts the restored blocks
    with MemoryClient(new.path, "kv", "rw") as nxt:
        assert nxt.layout.sizes == [KV_BYTES] and nxt.layout.extra == {"kv_spec": {"blocks": 7}}
        nxt.map_all()
        assert total(nxt, 0) == 3 * KV_BYTES
    for c in (writer, reader):
        c.close()


def test_restore_into_another_layout_is_refused_and_the_client_keeps_its_mappings(restarted):
    old, restart = restarted
    writer, _ = publish(old.path, 5)
    kv = own_kv(old.path, 1)
    new = restart()
    other, other_digest = publish(new.path, 9, nbytes=2 * W_BYTES, name="other")
    rival = own_kv(new.path, 2)
    baseline = server_fds(new)
    with pytest.raises(MemoryServiceError) as e:
        writer.restore()
    assert e.value.code == "bad_state" and other_digest in str(e.value)
    with pytest.raises(MemoryServiceError) as e:
        kv.restore()
    assert e.value.code == "bad_state"
    wait_disconnects(new, 2)
    assert server_fds(new) == baseline  # the fds that came with the refused requests were closed
    assert total(writer, 0) == 5 * W_BYTES and total(kv, 0) == 1 * KV_BYTES  # still ours, still mapped
    assert read_status(new.path)["pools"]["weights"]["committed_hash"] == other_digest
    for c in (writer, kv, other, rival):
        c.close()


def test_restore_needs_the_whole_layout_mapped(restarted):
    old, restart = restarted
    writer, _ = publish(old.path, 4)
    writer.unmap_all()  # asleep: no fds to give back
    restart()
    with pytest.raises(MemoryServiceError) as e:
        writer.restore()
    assert e.value.code == "bad_state"
    writer.release_all()


# -- bad Restore requests on raw sockets --------------------------------------------------------------

def _ask(path: Path, msg: p.Request, fds: list[int]) -> p.Reply:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        p.send_frame(s, msg, fds)
        reply, got = p.recv_frame(s)
        for fd in got:
            os.close(fd)
        return reply


def _layout(sizes: list[int], tensors: dict | None = None, extra: dict | None = None, digest: str | None = None):
    from understudy.memory.pool import layout_hash

    tensors, extra = tensors or {}, extra or {}
    return p.Layout(sizes, tensors, extra, digest if digest is not None else layout_hash(sizes, tensors, extra))


def _memfd(size: int, sealed: bool = True) -> int:
    import fcntl

    fd = os.memfd_create("test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_bad_restores_get_clear_errors_and_leak_no_fd(server):
    g = read_status(server.path)["granularity"]
    wait_disconnects(server, 1)
    baseline = server_fds(server)
    regular = tempfile.TemporaryFile()
    regular.truncate(g)
    cases = [
        # (request, fds, code, words in the message)
        (p.Status(), [regular.fileno()], "bad_request", "takes no file descriptors"),
        (p.Restore("weights", _layout([g, g])), [regular.fileno()], "bad_request", "came with 1 fds"),
        (p.Restore("weights", _layout([g], digest="0" * 16)), [regular.fileno()], "bad_request", "layout hash"),
        (p.Restore("weights", _layout([g - 1])), [regular.fileno()], "bad_request", "multiples"),
        (p.Restore("weights", _layout([g], {"t": TensorMeta(0, 0, (2 * g,), (1,), "uint8")})),
         [regular.fileno()], "bad_request", "do not fit"),
        (p.Restore("weights", _layout([g])), [regular.fileno()], "bad_request", "cannot take the allocations back"),
    ]
    if BACKEND == "host":
        unsealed, wrong_size = _memfd(g, sealed=False), _memfd(2 * g)
        cases += [(p.Restore("kv", _layout([g])), [unsealed], "bad_request", "not sealed"),
                  (p.Restore("kv", _layout([g])), [wrong_size], "bad_request", "holds")]
    for msg, fds, code, words in cases:
        reply = _ask(server.path, msg, fds)
        assert isinstance(reply, p.Error) and reply.code == code and words in reply.message, (msg, reply)
    wait_disconnects(server, len(cases))
    assert server_fds(server) == baseline
    status = read_status(server.path)
    assert status["pools"]["weights"]["state"] == "EMPTY" and status["bytes_in_use"] == 0
    regular.close()


def test_fds_behind_other_requests_close_the_connection(server):
    """Only a connection's first request may bring fds: a peer cannot pile them up in the server."""
    baseline = server_fds(server)
    fd = os.open("/dev/null", os.O_RDONLY)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        # Two requests at once: the second (with an fd) is read while the first waits for its lock.
        p.send_frame(s, p.Hello("kv", "rw", 5.0))
        p.send_frame(s, p.Status(), [fd])
        replies = [p.recv_frame(s)[0] for _ in range(2)]
        assert isinstance(replies[0], p.Granted), replies
        assert isinstance(replies[1], p.Error) and replies[1].code in ("bad_request", "bad_state"), replies
    os.close(fd)
    wait_disconnects(server, 1)
    assert server_fds(server) == baseline
