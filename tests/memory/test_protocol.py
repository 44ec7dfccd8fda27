"""Bad input never hurts anyone else.

One real memory server serves the whole module. At the start a writer publishes
weights (known bytes) and stays on as a reader; after every test (and every
fuzzed batch) a well-behaved client must still be served, see the same
committed bytes, and take and give back the kv pool. Malformed frames go out
on raw sockets, so nothing in the client library smooths them over.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from understudy.memory import MemoryClient, TensorMeta, read_status
from understudy.memory import protocol as p
from understudy.memory.backends.host import HostBackend

from tests.helpers.procs import BACKEND
from tests.helpers.procs import ServerProcess

MiB = 1 << 20
REPLY_TIMEOUT = 10.0  # seconds a raw socket waits for a reply before the test fails
KNOWN_CODES = {"timeout", "bad_frame", "bad_request", "bad_state", "out_of_memory", "permission",
               "frame_too_large", "too_many_requests"}


# ------------------------------------------------------------------ helpers --
def pattern(nbytes: int, seed: int) -> torch.Tensor:
    return ((torch.arange(nbytes, dtype=torch.int64) * (2 * seed + 3) + seed) % 251).to(torch.uint8)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


class Raw:
    """A bare connection: frames (or any bytes) go out exactly as given."""

    def __init__(self, path: Path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(str(path))

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(p.HEADER.pack(len(body)) + body)

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.sendall(p.encode(msg))

    def recv(self) -> p.Reply:
        reply, fds = p.recv_frame(self.sock)
        for fd in fds:
            os.close(fd)
        return reply

    def recv_with_fds(self) -> tuple[p.Reply, list[int]]:
        return p.recv_frame(self.sock)

    def call(self, msg: msgspec.Struct) -> p.Reply:
        self.send(msg)
        return self.recv()

    def call_body(self, body: bytes) -> p.Reply:
        self.send_body(body)
        return self.recv()

    def closed_by_server(self) -> bool:
        """True once the server hung up (waits for it, up to REPLY_TIMEOUT)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Raw":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assert_error(reply: p.Reply, code: str) -> None:
    assert isinstance(reply, p.Error), reply
    assert reply.code == code, reply


def assert_status_works(raw: Raw) -> None:
    reply = raw.call(p.Status())
    assert isinstance(reply, p.StatusReply), reply
    assert "weights" in reply.status["pools"]


@dataclass
class Published:
    srv: ServerProcess
    holder: MemoryClient  # the publisher, a reader since its commit
    layout_hash: str
    digests: list[str]

    @property
    def path(self) -> Path:
        return self.srv.path


def check_intact(pub: Published) -> None:
    """The server lives and serves; the committed weights are what was published."""
    assert pub.srv.proc.poll() is None, "the memory server died"
    # A fresh reader; its wait also lets the server finish with connections we closed.
    with MemoryClient(pub.path, "weights", "ro", timeout=REPLY_TIMEOUT, name="checker") as r:
        r.map_all()
        assert r.mapped_hash == pub.layout_hash
        got = [digest(r.backend.tensor(m.va, m.size)) for _, m in sorted(r.mappings.items())]
        assert got == pub.digests
        weights = r.status()["pools"]["weights"]
        assert weights["state"] == "RO" and weights["writer"] is None
        assert weights["committed_hash"] == pub.layout_hash and weights["allocations"] == 2
        assert weights["waiting_writers"] == 0
    held = [digest(pub.holder.backend.tensor(m.va, m.size)) for _, m in sorted(pub.holder.mappings.items())]
    assert held == pub.digests
    # Nobody is left holding kv (a dead peer's session would): take it, clear it, give it back.
    with MemoryClient(pub.path, "kv", "rw", timeout=REPLY_TIMEOUT, name="kv-checker") as kv:
        kv.reset()


# ------------------------------------------------------------------ fixtures --
@pytest.fixture(scope="module")
def published():
    d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    srv = ServerProcess.start(BACKEND, d)
    try:
        w = MemoryClient(srv.path, "weights", "rw", timeout=REPLY_TIMEOUT, name="publisher")
        digests = []
        for seed, size in enumerate((3 * MiB, 1 * MiB)):
            m = w.allocate(size)
            t = w.backend.tensor(m.va, m.size)
            t.copy_(pattern(m.size, seed).to(t.device))
            digests.append(digest(t))
        w.set_metadata({"a": TensorMeta(0, 0, (512, 512), (512, 1), "float32"),
                        "b": TensorMeta(1, 256, (16,), (1,), "int8")}, {"model": "fuzz"})
        pub = Published(srv, w, w.commit(), digests)
        yield pub
        w.close()
    finally:
        srv.stop()
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def intact_after(published):
    yield
    check_intact(published)


# ---------------------------------------------------------------- fuzzing --
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

TAGS = ["Hello", "Allocate", "Export", "GetLayout", "SetMetadata", "Commit", "Reset", "Status",
        "Granted", "Error", "Ok"]
FIELDS = ["pool", "mode", "timeout", "name", "size", "indices", "tensors", "extra", "replace", "code"]
leaves = (st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
          | st.text(max_size=8) | st.binary(max_size=8)
          | st.sampled_from(["weights", "kv", "rw", "ro", "float32", "uint8", 0, -1, 2 * MiB]))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=10)
type_tags = st.sampled_from(TAGS) | st.text(max_size=12) | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.none()


@st.composite
def request_maps(draw) -> bytes:
    """A msgpack map shaped like a request: a known or made-up tag, fields of any type."""
    fields = draw(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), values, max_size=5))
    if draw(st.booleans()):
        fields["type"] = draw(type_tags)
    body = msgspec.msgpack.encode(fields)
    try:
        req = p.decode_request(body)
    except p.ProtocolError:
        return body
    # Well-formed by chance: never wait for a lock or for memory (the test would block on it).
    if isinstance(req, (p.Hello, p.Allocate)):
        fields["timeout"] = 0.0
        body = msgspec.msgpack.encode(fields)
    return body


def expect_reply(body: bytes, reply: p.Reply) -> None:
    """Undecodable: bad_frame. Decodable by chance: any reply but an internal error."""
    try:
        p.decode_request(body)
    except p.ProtocolError:
        assert_error(reply, "bad_frame")
        return
    if isinstance(reply, p.Error):
        assert reply.code in KNOWN_CODES, reply


@FUZZ
@given(bodies=st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_fuzz_random_bodies(published, bodies):
    with Raw(published.path) as raw:
        # pipelined in one write: one reply each, in order, and the connection goes on
        raw.send_bytes(b"".join(p.HEADER.pack(len(b)) + b for b in bodies))
        for body in bodies:
            expect_reply(body, raw.recv())
        assert_status_works(raw)
    check_intact(published)


@FUZZ
@given(bodies=st.lists(request_maps(), min_size=1, max_size=4))
def test_fuzz_request_shaped_maps(published, bodies):
    with Raw(published.path) as raw:
        for body in bodies:
            expect_reply(body, raw.call_body(body))
        assert_status_works(raw)
    check_intact(published)


ints = st.integers(-3, 3) | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.sampled_from([MiB, 2 * MiB + 1])
floats = st.sampled_from([0.0, -1.0, math.nan, -math.inf])  # never a wait: the test would block on it
metas = st.builds(TensorMeta, ints, ints, st.lists(ints, max_size=3).map(tuple),
                  st.lists(ints, max_size=3).map(tuple), st.sampled_from(["float32", "uint8", "int64", "complex64"]))
typed_requests = st.one_of(
    st.builds(p.Hello, st.sampled_from(["weights", "kv"]), st.sampled_from(["rw", "ro"]), floats, st.text(max_size=5)),
    st.builds(p.Allocate, ints, floats),
    st.builds(p.Export, st.none() | st.lists(ints, max_size=4)),
    st.builds(p.SetMetadata, st.dictionaries(st.text(max_size=3), metas, max_size=2),
              st.dictionaries(st.text(max_size=3), values, max_size=2), st.booleans()),
    st.sampled_from([p.GetLayout(), p.Commit(), p.Reset(), p.Status()]),
)


@FUZZ
@given(requests=st.lists(typed_requests, min_size=1, max_size=8))
def test_fuzz_well_typed_requests_in_any_order(published, requests):
    """Every field of the right type, any value, any order: answered one by one, never `internal`."""
    with Raw(published.path) as raw:
        for req in requests:
            reply = raw.call(req)
            if isinstance(reply, p.Error):
                assert reply.code in KNOWN_CODES, reply
        assert_status_works(raw)
    check_intact(published)


@FUZZ
@given(prefix=st.lists(request_maps() | st.binary(max_size=50), max_size=3),
       last=request_maps() | st.binary(min_size=1, max_size=100), data=st.data())
def test_fuzz_truncated_frame_then_close(published, prefix, last, data):
    whole = p.HEADER.pack(len(last)) + last
    cut = data.draw(st.integers(1, len(whole) - 1), label="cut")
    with Raw(published.path) as raw:
        raw.send_bytes(b"".join(p.HEADER.pack(len(b)) + b for b in prefix) + whole[:cut])
    with Raw(published.path) as other:
        assert_status_works(other)
    check_intact(published)


# ------------------------------------------------------ malformed frames --
@pytest.mark.parametrize("body", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    b"not msgpack at all",
    b"\x93\x01\x02\x03",  # an array, not a map
    msgspec.msgpack.encode({"pool": "weights", "mode": "ro"}),  # no type tag
    msgspec.msgpack.encode({"type": 7}),
    msgspec.msgpack.encode({"type": "Status"}) + b"\x00",  # trailing bytes
    msgspec.msgpack.encode({"type": "Hello", "pool": "weights"})[:-3],  # truncated inside the body
], ids=["empty", "c1", "text", "array", "no-type", "int-type", "trailing", "cut-body"])
def test_undecodable_body_gets_bad_frame_and_the_connection_goes_on(published, body):
    with Raw(published.path) as raw:
        assert_status_works(raw)
        assert_error(raw.call_body(body), "bad_frame")
        assert_status_works(raw)
        assert_error(raw.call_body(body), "bad_frame")  # again: nothing got stuck
        assert_status_works(raw)


def test_deeply_nested_body_is_a_bad_frame(published):
    deep = b"\x82\xa4type\xabSetMetadata\xa5extra\x81\xa1a" + b"\x91" * 100_000 + b"\xc0"
    with Raw(published.path) as raw:
        assert_error(raw.call_body(deep), "bad_frame")
        assert_status_works(raw)


@pytest.mark.parametrize("body", [
    msgspec.msgpack.encode({"type": "Shutdown"}),
    msgspec.msgpack.encode({"type": "Hello2", "pool": "weights", "mode": "ro"}),
    msgspec.msgpack.encode({"type": ""}),
    msgspec.msgpack.encode({"type": "Granted", "session": 1, "pool": "weights", "mode": "rw", "backend": "host",
                            "identity": "x", "granularity": 1, "layout": {}}),  # a reply is no request
], ids=["shutdown", "hello2", "empty-tag", "reply-tag"])
def test_unknown_message_type_is_a_bad_frame(published, body):
    with Raw(published.path) as raw:
        assert_error(raw.call_body(body), "bad_frame")
        assert_status_works(raw)


@pytest.mark.parametrize("fields", [
    {"type": "Hello", "pool": 5, "mode": "ro"},
    {"type": "Hello", "pool": "gpu", "mode": "ro"},
    {"type": "Hello", "pool": "weights", "mode": "wo"},
    {"type": "Hello", "pool": "weights", "mode": "ro", "timeout": "soon"},
    {"type": "Hello", "pool": "weights", "mode": "ro", "name": ["x"]},
    {"type": "Allocate", "size": "big"},
    {"type": "Allocate", "size": 1.5},
    {"type": "Export", "indices": "all"},
    {"type": "Export", "indices": [0, "1"]},
    {"type": "SetMetadata", "tensors": {"w": [0, 0, [2], [1]]}},  # dtype missing
    {"type": "SetMetadata", "tensors": {"w": {"alloc": 0}}},
    {"type": "SetMetadata", "tensors": [1, 2]},
    {"type": "SetMetadata", "extra": [1, 2]},
    {"type": "SetMetadata", "replace": "yes"},
], ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items() if k != "type")[:40])
def test_wrong_field_types_are_bad_frames(published, fields):
    with Raw(published.path) as raw:
        assert_error(raw.call_body(msgspec.msgpack.encode(fields)), "bad_frame")
        assert_status_works(raw)
    # the same on a connection that holds a lock (kv)
    with Raw(published.path) as raw:
        assert isinstance(raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
        assert_error(raw.call_body(msgspec.msgpack.encode(fields)), "bad_frame")
        assert isinstance(raw.call(p.GetLayout()), p.LayoutReply)


@pytest.mark.parametrize("length", [p.MAX_FRAME + 1, 0xFFFFFFFF])
def test_oversized_length_gets_frame_too_large_and_a_hang_up(published, length):
    with Raw(published.path) as raw:
        # the request before it is still answered, in order; then the error; then the end
        raw.send_bytes(p.encode(p.Status()) + p.HEADER.pack(length) + b"\x80" * 64)
        assert isinstance(raw.recv(), p.StatusReply)
        assert_error(raw.recv(), "frame_too_large")
        assert raw.closed_by_server()
    published.srv.wait_event("bad_frame", reason=f"length {length}")


def test_a_frame_of_exactly_max_frame_is_read_and_refused_as_a_body(published):
    with Raw(published.path) as raw:
        assert_error(raw.call_body(b"\xc1" * p.MAX_FRAME), "bad_frame")
        assert_status_works(raw)


# -------------------------------------------------------- bad arguments --
def test_bad_arguments_are_bad_requests_and_change_nothing(published):
    with Raw(published.path) as raw:
        for timeout in (-1.0, -1e-9, math.nan, -math.inf):
            assert_error(raw.call(p.Hello("kv", "rw", timeout)), "bad_request")
        assert isinstance(raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)  # not locked by those
        assert_error(raw.call(p.Export([0])), "bad_request")  # nothing allocated yet
        for size in (-1, 0, -(2 ** 63)):
            assert_error(raw.call(p.Allocate(size)), "bad_request")
        for timeout in (-1.0, math.nan):
            assert_error(raw.call(p.Allocate(MiB, timeout)), "bad_request")
        raw.send(p.Allocate(MiB))
        allocated, fds = raw.recv_with_fds()
        for fd in fds:
            os.close(fd)
        assert isinstance(allocated, p.Allocated) and allocated.index == 0 and len(fds) == 1
        size = allocated.size
        before = raw.call(p.GetLayout()).layout
        for indices in ([1], [-1], [0, 1], [2 ** 40], list(range(p.MAX_FDS_PER_FRAME + 1))):
            assert_error(raw.call(p.Export(indices)), "bad_request")
        bad_tensors = {
            "too-long": TensorMeta(0, 0, (size + 1,), (1,), "uint8"),
            "past-the-end": TensorMeta(0, size - 2, (4,), (1,), "uint8"),
            "huge-stride": TensorMeta(0, 0, (2, 2), (size, 1), "float32"),
            "no-such-alloc": TensorMeta(1, 0, (4,), (1,), "uint8"),
            "negative-alloc": TensorMeta(-1, 0, (4,), (1,), "uint8"),
            "negative-offset": TensorMeta(0, -4, (4,), (1,), "float32"),
            "misaligned": TensorMeta(0, 2, (4,), (1,), "float32"),
            "negative-dim": TensorMeta(0, 0, (-4,), (1,), "uint8"),
            "negative-stride": TensorMeta(0, 64, (4,), (-1,), "uint8"),
            "rank-mismatch": TensorMeta(0, 0, (4, 4), (1,), "uint8"),
            "unknown-dtype": TensorMeta(0, 0, (4,), (1,), "complex128"),
            "torch-prefixed": TensorMeta(0, 0, (4,), (1,), "torch.float32"),
        }
        for name, meta in bad_tensors.items():
            reply = raw.call(p.SetMetadata({"ok": TensorMeta(0, 0, (4,), (1,), "uint8"), name: meta}))
            assert_error(reply, "bad_request")
            assert name in reply.message
        assert raw.call(p.GetLayout()).layout == before  # no half-applied metadata
        ok = raw.call(p.SetMetadata({"ok": TensorMeta(0, 0, (size,), (1,), "uint8")}))
        assert isinstance(ok, p.Ok) and ok.layout_hash != before.hash
        assert isinstance(raw.call(p.Reset()), p.Ok)


def test_absurd_allocation_size_is_a_bad_request(published):
    with Raw(published.path) as raw:
        assert isinstance(raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
        used = raw.call(p.Status()).status["bytes_in_use"]
        for size in (2 ** 64 - 1, 2 ** 63, 2 ** 63 - 1):
            assert_error(raw.call(p.Allocate(size, 0)), "bad_request")
        assert raw.call(p.Status()).status["bytes_in_use"] == used
        assert raw.call(p.GetLayout()).layout.sizes == []


def test_host_create_leaks_no_fd_on_failure():
    backend = HostBackend(0)

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for size in (2 ** 64, 2 ** 63):
        with pytest.raises((OverflowError, OSError)):
            backend.create(size)
    assert open_fds() == before


def test_unhashable_extra_is_refused_and_harms_nobody(published):
    """Metadata that cannot be hashed (non-str map keys, deep nesting) used to be merged
    first: every later status, grant and commit then failed, for every client."""
    def nested(depth: int):
        v = None
        for _ in range(depth):
            v = [v]
        return v

    def deep_body(depth: int, replace: bool) -> bytes:  # too deep for our own encoder's stack
        head = b"\x83\xa7replace" + (b"\xc3" if replace else b"\xc2")
        return head + b"\xa4type\xabSetMetadata\xa5extra\x81\xa1m" + b"\x91" * depth + b"\xc0"

    with Raw(published.path) as raw:
        assert isinstance(raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
        assert isinstance(raw.call(p.SetMetadata(extra={"good": {"a": [1, 2]}})), p.Ok)
        before = raw.call(p.GetLayout()).layout
        bad = [msgspec.msgpack.encode({"type": "SetMetadata", "extra": extra, "replace": replace})
               for extra in ({"m": {1: 2}}, {"m": {"a": {3: [1]}}}, {"m": [{b"k": 1}]}, {"m": nested(40)})
               for replace in (False, True)]
        bad += [deep_body(depth, replace) for depth in (900, 960, 990, 5000) for replace in (False, True)]
        for body in bad:
            reply = raw.call_body(body)
            assert isinstance(reply, p.Error) and reply.code in ("bad_request", "bad_frame"), reply
            assert raw.call(p.GetLayout()).layout == before
            # every other client is still served (status hashes every layout)
            assert read_status(published.path)["pools"]["kv"]["layout_hash"] == before.hash
        assert isinstance(raw.call(p.SetMetadata(extra={"m": nested(20)})), p.Ok)
        assert isinstance(raw.call(p.Reset()), p.Ok)


# -------------------------------------------------- requests out of state --
def test_requests_before_hello_are_bad_state(published):
    with Raw(published.path) as raw:
        for req in (p.Allocate(MiB), p.Commit(), p.SetMetadata(), p.Export(), p.Export([0]), p.GetLayout(),
                    p.Reset()):
            reply = raw.call(req)
            assert_error(reply, "bad_state")
            assert "Hello" in reply.message
        assert_status_works(raw)  # Status needs no lock


def test_a_reader_cannot_write(published):
    with Raw(published.path) as raw:
        granted = raw.call(p.Hello("weights", "ro", REPLY_TIMEOUT))
        assert isinstance(granted, p.Granted) and granted.mode == "ro"
        assert granted.layout.hash == published.layout_hash
        for req in (p.Allocate(MiB), p.SetMetadata(extra={"x": 1}), p.Commit(), p.Reset()):
            assert_error(raw.call(req), "bad_state")
        raw.send(p.Export())
        exported, fds = raw.recv_with_fds()
        try:
            assert isinstance(exported, p.Exported) and exported.indices == [0, 1] and len(fds) == 2
        finally:
            for fd in fds:
                os.close(fd)
        assert raw.call(p.GetLayout()).layout.hash == published.layout_hash


def test_hello_twice_on_one_connection_is_bad_state(published):
    with Raw(published.path) as raw:
        first = raw.call(p.Hello("weights", "ro", REPLY_TIMEOUT))
        assert isinstance(first, p.Granted)
        for hello in (p.Hello("weights", "ro", 0), p.Hello("kv", "rw", 0), p.Hello("weights", "rw", 0)):
            assert_error(raw.call(hello), "bad_state")
        # the first lock is still this session's
        weights = raw.call(p.Status()).status["pools"]["weights"]
        assert first.session in weights["readers"]
        assert isinstance(raw.call(p.GetLayout()), p.LayoutReply)


def test_kv_refuses_ro_and_commit(published):
    with Raw(published.path) as raw:
        assert_error(raw.call(p.Hello("kv", "ro", 0)), "bad_request")
        assert_error(raw.call(p.Hello("kv", "ro", REPLY_TIMEOUT)), "bad_request")
        assert isinstance(raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)  # still free to ask for
        reply = raw.call(p.Commit())
        assert_error(reply, "bad_request")
        assert raw.call(p.Status()).status["pools"]["kv"]["state"] == "RW"


def test_try_lock_refusals_are_timeouts(published):
    with Raw(published.path) as raw:
        # weights are read by the publisher: no writer can get in, at once
        assert_error(raw.call(p.Hello("weights", "rw", 0)), "timeout")
        with Raw(published.path) as owner:
            assert isinstance(owner.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
            assert_error(raw.call(p.Hello("kv", "rw", 0)), "timeout")
        # a failed Hello leaves the connection free to ask again
        assert isinstance(raw.call(p.Hello("weights", "ro", 0)), p.Granted)


# ------------------------------------------------- peers that go away --
def test_disconnect_in_the_middle_of_a_frame_releases_the_session(published):
    srv = published.srv
    for cut in (1, 3, 4, 6):  # inside the header, at its end, inside the body
        raw = Raw(published.path)
        granted = raw.call(p.Hello("kv", "rw", REPLY_TIMEOUT))
        assert isinstance(granted, p.Granted)
        allocated = raw.call(p.Allocate(MiB))
        assert isinstance(allocated, p.Allocated)
        raw.send_bytes(p.encode(p.SetMetadata(extra={"x": "y" * 50}))[:cut])
        raw.close()
        srv.wait_event("disconnected", session=granted.session)
        kv = read_status(published.path)["pools"]["kv"]
        # the owner is gone; its allocation stays for the next owner to adopt
        assert kv["state"] == "COMMITTED" and kv["writer"] is None and kv["allocations"] == 1
        with MemoryClient(published.path, "kv", "rw", timeout=0) as c:
            assert c.layout.sizes == [allocated.size]
            c.reset()


def test_disconnect_in_the_middle_of_a_frame_while_waiting_for_a_lock(published):
    with Raw(published.path) as owner:
        assert isinstance(owner.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
        waiter = Raw(published.path)
        waiter.send_bytes(p.encode(p.Hello("kv", "rw", 3600)) + p.encode(p.Status())[:3])
        waiter.close()
    # the waiter must not inherit the lock it waited for once the owner leaves
    with MemoryClient(published.path, "kv", "rw", timeout=REPLY_TIMEOUT) as c:
        assert c.connected


def test_pipelined_requests_of_a_dead_peer_are_released(published):
    """A peer that queued many requests behind one waiting for a lock, then died.

    The server used to stop reading (a full read-ahead queue) and so never saw
    the hang-up: the dead session got the kv lock, or stayed a waiting writer
    that held back every new weights reader, forever."""
    many = p.encode(p.Status()) * 40
    with Raw(published.path) as owner:
        assert isinstance(owner.call(p.Hello("kv", "rw", REPLY_TIMEOUT)), p.Granted)
        dead = Raw(published.path)
        dead.send_bytes(p.encode(p.Hello("kv", "rw", 3600)) + many)
        dead.close()
    with MemoryClient(published.path, "kv", "rw", timeout=REPLY_TIMEOUT) as c:
        assert c.connected

    dead = Raw(published.path)
    dead.send_bytes(p.encode(p.Hello("weights", "rw", 3600)) + many)
    dead.close()
    with MemoryClient(published.path, "weights", "ro", timeout=REPLY_TIMEOUT) as r:
        assert r.layout.hash == published.layout_hash


def test_read_ahead_beyond_the_limit_is_hung_up_on(published):
    """Requests piling up behind one that waits: past the read-ahead budget the server
    stops queueing them, drops the rest of the stream and ends the session at hang-up."""
    from understudy.memory.server import READ_AHEAD

    junk = b"\xc1" * (10 * MiB)
    dead = Raw(published.path)
    dead.send_bytes(p.encode(p.Hello("weights", "rw", 3600)) + (p.HEADER.pack(len(junk)) + junk) * 2
                    + p.encode(p.Status()) * 10)
    dead.close()
    published.srv.wait_event("bad_frame", reason=f"read-ahead over {READ_AHEAD} bytes")
    with MemoryClient(published.path, "weights", "ro", timeout=REPLY_TIMEOUT) as r:
        assert r.layout.hash == published.layout_hash


def test_a_peer_that_never_reads_replies_hurts_nobody(published):
    with Raw(published.path) as greedy:
        greedy.sock.setblocking(False)
        frame = p.encode(p.Status())
        sent = 0
        try:
            while sent < 4000:  # until its buffers are full (replies are far larger than requests)
                greedy.sock.send(frame)
                sent += 1
        except BlockingIOError:
            pass
        # meanwhile everybody else is served
        for _ in range(3):
            assert read_status(published.path)["pools"]["weights"]["state"] == "RO"
        check_intact(published)


def test_struct_header_is_big_endian(published):
    # a little-endian length of a 16-byte body reads as 268435456 bytes: too large
    with Raw(published.path) as raw:
        raw.send_bytes(struct.pack("<I", 16) + b"\x80" * 16)
        assert_error(raw.recv(), "frame_too_large")
        assert raw.closed_by_server()
