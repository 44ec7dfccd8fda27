"""Who may use the memory service, and what a reader can do with what it gets.

Peer-credential tests fork a child that drops to an unprivileged uid (nobody,
65534) before it connects; they need root to do that and skip otherwise (CI
runs as root). Everything else runs as any user.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import msgspec
import pytest

from understudy.memory import BackendError, MemoryClient, device_socket_path, read_status
from understudy.memory import protocol as p

from tests.helpers.procs import BACKEND
from tests.helpers.procs import ServerProcess

NOBODY = 65534
GROUP = 4242  # a gid nobody belongs to unless a test says so
MiB = 1 << 20

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing uid needs root (CI runs as root)")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def own_dir():
    """A temporary directory that may get subdirectories (conftest's socket_dir may not)."""
    d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def host_server():
    """A default host-backend server shared by the tests below that leave it as they found it."""
    d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    srv = ServerProcess.start("host", d)
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


def traversable(d: Path) -> Path:
    """Let other uids reach the socket inside (mkdtemp makes directories 0700)."""
    os.chmod(d, 0o711)
    return d


# ---------------------------------------------- a client of another uid --
def as_user(fn, *, uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = ()) -> dict:
    """Run fn() in a forked child that first drops to uid/gid/groups; return what it returned.

    (No exec: the venv's interpreter may not be reachable for another uid.)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            assert os.getuid() == uid and os.geteuid() == uid
            out = fn()
            code = 0
        except BaseException as e:  # report it to the parent
            out = {"child_error": repr(e)}
        try:
            os.write(w, json.dumps(out).encode())
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    out = json.loads(b"".join(chunks) or b"{}")
    assert "child_error" not in out, out["child_error"]
    assert os.waitstatus_to_exitcode(status) == 0
    return out


def probe(path: Path, *requests: msgspec.Struct):
    """A child's visit: connect, send each request and read its reply, then see if the server hung up."""
    def visit() -> dict:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        try:
            s.connect(str(path))
        except OSError as e:
            return {"connect_errno": e.errno}
        replies = []
        if not requests:  # nothing to ask: only listen
            replies.append(_recv(s))
        for req in requests:
            try:
                s.sendall(p.encode(req))
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused already: its answer is waiting to be read
            replies.append(_recv(s))
            if replies[-1].get("code") == "permission":
                break
        if replies[-1].get("code") != "permission":
            return {"replies": replies}
        try:  # a refused peer is hung up on: wait for that (up to the socket timeout)
            closed = s.recv(1) == b""
        except ConnectionResetError:
            closed = True
        return {"replies": replies, "closed": closed}
    return visit


def _recv(s: socket.socket) -> dict:
    reply, fds = p.recv_frame(s)
    for fd in fds:
        os.close(fd)
    return msgspec.to_builtins(reply)


# ----------------------------------------------------- the socket's mode --
def test_socket_is_0600_and_its_lock_too_by_default(host_server):
    server = host_server
    st = os.stat(server.path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert mode_of(server.path.with_suffix(".lock")) == 0o600
    assert server.events("listening")[0]["mode"] == oct(0o600)


def test_socket_dir_is_created_0700(own_dir):
    d = own_dir / "sockets"
    srv = ServerProcess.start(BACKEND, d)
    try:
        assert mode_of(d) == 0o700
        assert os.stat(d).st_uid == os.geteuid()
        assert mode_of(srv.path) == 0o600
        assert read_status(srv.path)["pid"] == srv.pid
    finally:
        srv.stop()


def _a_group_we_may_use() -> int:
    if os.geteuid() == 0:
        return GROUP
    others = [g for g in os.getgroups() if g != os.getgid()]
    return others[0] if others else os.getgid()


@pytest.mark.parametrize("extra, mode", [
    (("--socket-mode", "660", "--socket-group", "{gid}"), 0o660),
    (("--socket-mode", "640", "--socket-group", "{gid}"), 0o640),
], ids=["660-group", "640-group"])
def test_socket_mode_and_group_options(socket_dir, extra, mode):
    gid = _a_group_we_may_use()
    srv = ServerProcess.start(BACKEND, socket_dir, *(a.format(gid=gid) for a in extra))
    try:
        st = os.stat(srv.path)
        assert stat.S_IMODE(st.st_mode) == mode
        if "--socket-group" in extra:
            assert st.st_gid == gid
        assert read_status(srv.path)["pid"] == srv.pid
    finally:
        srv.stop()


# ------------------------------------------------------ peer credentials --
@needs_root
def test_other_uid_is_refused_by_peer_credentials(socket_dir):
    traversable(socket_dir)
    srv = ServerProcess.start(BACKEND, socket_dir, "--socket-mode", "666")  # the filesystem lets anyone in
    try:
        for requests in ((), (p.Status(),), (p.Hello("kv", "rw", 0),)):
            out = as_user(probe(srv.path, *requests))
            assert "connect_errno" not in out
            (reply,) = out["replies"]
            assert reply["type"] == "Error" and reply["code"] == "permission", reply
            assert str(NOBODY) in reply["message"]
            assert out["closed"]
            event = srv.wait_event("refused", peer_uid=NOBODY)
            assert event["reason"] == "peer credentials"
        status = read_status(srv.path)  # we (root) still get in; nobody got a session or a lock
        assert all(s["uid"] != NOBODY for s in status["sessions"])
        assert status["pools"]["kv"]["state"] == "EMPTY"
        assert len(srv.events("refused")) == 3
        assert mode_of(srv.path) == 0o666
    finally:
        srv.stop()


@needs_root
def test_other_uid_cannot_even_connect_with_the_default_mode(host_server):
    server = host_server
    traversable(server.path.parent)
    out = as_user(probe(server.path, p.Status()))
    assert out == {"connect_errno": 13}  # EACCES, from the filesystem
    assert read_status(server.path)["pid"] == server.pid
    assert server.events("refused") == []  # it never reached the server


@needs_root
def test_members_of_the_socket_group_are_admitted(socket_dir):
    traversable(socket_dir)
    srv = ServerProcess.start(BACKEND, socket_dir, "--socket-group", str(GROUP))  # mode 660
    try:
        st = os.stat(srv.path)  # a group alone opens the socket to it
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == GROUP
        # a supplementary group, as a user's login groups are
        out = as_user(probe(srv.path, p.Status(), p.Hello("kv", "rw", 10)), groups=(GROUP,))
        status, granted = out["replies"]
        assert status["type"] == "StatusReply" and granted["type"] == "Granted", out
        # the primary group
        out = as_user(probe(srv.path, p.Status()), gid=GROUP)
        assert out["replies"][0]["type"] == "StatusReply", out
        # not a member: the filesystem already says no
        assert as_user(probe(srv.path, p.Status()), groups=(GROUP + 1,)) == {"connect_errno": 13}
        assert srv.events("refused") == []
    finally:
        srv.stop()


@needs_root
def test_socket_group_is_checked_by_the_server_too(socket_dir):
    """With the socket open to all (666), only group members get past the peer check."""
    traversable(socket_dir)
    srv = ServerProcess.start(BACKEND, socket_dir, "--socket-mode", "666", "--socket-group", str(GROUP))
    try:
        out = as_user(probe(srv.path, p.Status()), groups=(GROUP,))
        assert out["replies"][0]["type"] == "StatusReply", out
        out = as_user(probe(srv.path, p.Status()), groups=(GROUP + 1,))
        assert out["replies"][0]["code"] == "permission" and out["closed"], out
        srv.wait_event("refused", peer_uid=NOBODY)
    finally:
        srv.stop()


# ------------------------------------------- readers cannot write weights --
def _export_one(client: MemoryClient, index: int) -> int:
    (fd,) = client._export([index])
    return fd


def _access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _map_and_fill(backend, size: int, fd: int, value: int) -> None:
    va = backend.reserve(size)
    try:
        backend.map(va, size, fd, 0, readonly=False)
        backend.tensor(va, size).fill_(value)
        backend.unmap(va, size)
    finally:
        backend.free_reservation(va, size)


def test_a_reader_fd_cannot_be_mapped_writable_on_host(host_server):
    srv = host_server
    try:
        w = MemoryClient(srv.path, "weights", "rw", name="writer")
        m = w.allocate(MiB)
        size, backend = m.size, w.backend
        fd = _export_one(w, 0)
        try:
            assert _access_mode(fd) == os.O_RDWR
            _map_and_fill(backend, size, fd, 42)  # the writer's fd maps read-write
        finally:
            os.close(fd)
        assert int(backend.tensor(m.va, size)[:4096].sum()) == 42 * 4096  # same memory as its own mapping
        w.commit()

        with MemoryClient(srv.path, "weights", "ro", name="reader") as r:
            fd = _export_one(r, 0)
            va = backend.reserve(size)
            try:
                assert _access_mode(fd) == os.O_RDONLY
                with pytest.raises(BackendError, match="mmap failed"):
                    backend.map(va, size, fd, 0, readonly=False)
                backend.map(va, size, fd, 0, readonly=True)  # reading is what it may do
                assert int(backend.tensor(va, size)[:4096].sum()) == 42 * 4096
                # and it cannot upgrade the read-only mapping either
                with pytest.raises(BackendError, match="mprotect failed"):
                    backend.set_access(va, size, readonly=False)
                backend.unmap(va, size)
            finally:
                backend.free_reservation(va, size)
                os.close(fd)
            r.map_all()
            assert all(mp.readonly for mp in r.mappings.values())

        # the writer became a reader at commit: what it gets now is read-only too
        fd = _export_one(w, 0)
        try:
            assert _access_mode(fd) == os.O_RDONLY
            va = backend.reserve(size)
            try:
                with pytest.raises(BackendError):
                    backend.map(va, size, fd, 0, readonly=False)
            finally:
                backend.free_reservation(va, size)
        finally:
            os.close(fd)
        w.close()
    finally:
        with MemoryClient(srv.path, "weights", "rw", timeout=10) as w:  # leave the pool EMPTY
            w.reset()


def test_a_reader_cannot_reopen_its_fd_writable_on_host(host_server):
    """O_RDONLY alone is not enough: /proc/self/fd/N reopens the same memfd read-write."""
    srv = host_server
    with MemoryClient(srv.path, "weights", "rw", timeout=10) as w:
        m = w.allocate(MiB)
        w.backend.tensor(m.va, m.size).fill_(7)
        w.commit()
        with MemoryClient(srv.path, "weights", "ro", timeout=10) as r:
            backend, size = r.backend, m.size
            fd = _export_one(r, 0)
            try:
                rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # the inode lets it: mode 0777
            finally:
                os.close(fd)
            try:
                va = backend.reserve(size)
                try:
                    with pytest.raises(BackendError, match="mmap failed"):
                        backend.map(va, size, rw, 0, readonly=False)
                finally:
                    backend.free_reservation(va, size)
                with pytest.raises(PermissionError):
                    os.pwrite(rw, b"\x00" * 16, 0)
                with pytest.raises(PermissionError):
                    os.ftruncate(rw, 0)  # would SIGBUS every reader
                with pytest.raises(PermissionError):
                    os.ftruncate(rw, 2 * size)
            finally:
                os.close(rw)
            r.map_all()
            assert int(r.backend.tensor(r.mappings[0].va, size).sum()) == 7 * size
        w.close()
    with MemoryClient(srv.path, "weights", "rw", timeout=10) as w:  # leave the pool EMPTY
        w.reset()


def test_kv_owner_fds_are_writable_on_host(host_server):
    with MemoryClient(host_server.path, "kv", "rw", timeout=10) as kv:
        m = kv.allocate(MiB)
        fd = _export_one(kv, 0)
        try:
            assert _access_mode(fd) == os.O_RDWR
            _map_and_fill(kv.backend, m.size, fd, 3)
        finally:
            os.close(fd)
        assert int(kv.backend.tensor(m.va, m.size)[:100].sum()) == 300
        kv.reset()


# ---------------------------------------------- one server per device --
def _second_server(socket_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "understudy", "memory-server", "--backend", "host",
                           "--socket-dir", str(socket_dir), "--log-format", "json"],
                          capture_output=True, text=True, timeout=60)


def test_a_second_server_on_the_same_socket_is_refused(host_server):
    server, socket_dir = host_server, host_server.path.parent
    with MemoryClient(server.path, "kv", "rw", timeout=10) as kv:  # a client of the first server, holding a lock
        kv.allocate(MiB)
        inode = os.stat(server.path).st_ino
        second = _second_server(socket_dir)
        assert second.returncode != 0
        assert f"pid {server.pid}" in second.stderr and "already serves" in second.stderr, second.stderr
        assert '"event": "listening"' not in second.stderr
        # the first goes on as if nothing happened: same socket file, same session, same lock
        assert os.stat(server.path).st_ino == inode
        status = kv.status()
        assert status["pid"] == server.pid and status["pools"]["kv"]["state"] == "RW"
        assert read_status(server.path)["pid"] == server.pid
        kv.reset()
    assert server.proc.poll() is None


@pytest.mark.parametrize("leftover", ["killed-server", "regular-file"])
def test_a_stale_socket_is_removed_and_a_new_server_starts(socket_dir, leftover):
    if leftover == "killed-server":
        old = ServerProcess.start(BACKEND, socket_dir)
        path = old.path
        assert old.kill(signal.SIGKILL) == -signal.SIGKILL
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left behind by the dead server
        with pytest.raises(ConnectionRefusedError):
            read_status(path)
    else:
        path = device_socket_path(socket_dir, BACKEND, 0)
        path.write_text("not a socket")
    new = ServerProcess.start(BACKEND, socket_dir)
    try:
        assert new.path == path
        assert [e["path"] for e in new.events("stale_socket_removed")] == [str(path)]
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and mode_of(path) == 0o600
        assert read_status(path)["pid"] == new.pid
        with MemoryClient(path, "weights", "rw") as w:
            w.allocate(MiB)
            w.commit()
    finally:
        new.stop()
