"""The pools' state machines, driven at random against one real server.

A hypothesis RuleBasedStateMachine opens and closes real client connections
(MemoryClient, and raw sockets for try-lock Hellos with timeout=0) and keeps a
model of what the server should hold: per pool the state, the allocations,
the layout hashes, the bytes in use and the bytes themselves. After every
step the server's status must match the model.

One server serves every example (it takes a second to start); each example
starts from empty pools, and its teardown closes its clients and clears both
pools again. Every close waits for the server's `disconnected` event, so the
model never runs ahead of the server.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from understudy.memory import MemoryClient, MemoryServiceError, TensorMeta, read_status
from understudy.memory import protocol as p
from understudy.memory.pool import layout_hash

from tests.helpers.procs import BACKEND
from tests.helpers.procs import ServerProcess

MiB = 1 << 20
WAIT = 10.0  # seconds any reply or event may take before the test fails
MAX_ALLOCS = 3  # per layout, to keep every example small
SIZES = [1, 2 * MiB, 2 * MiB + 1]  # rounded to the 2 MiB granularity: 2, 2 and 4 MiB


@dataclass
class Layout:
    """The model of one layout: what the server should hold and what its bytes are."""

    sizes: list[int] = field(default_factory=list)
    fills: list[int] = field(default_factory=list)  # every byte of allocation i is fills[i]
    tensors: dict[str, TensorMeta] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def hash(self) -> str:
        return layout_hash(self.sizes, self.tensors, self.extra)

    def copy(self) -> "Layout":
        return Layout(list(self.sizes), list(self.fills), dict(self.tensors), dict(self.extra))


EMPTY_HASH = Layout().hash


def check_bytes(client: MemoryClient, layout: Layout) -> None:
    client.map_all()
    assert client.mapped_hash == layout.hash
    for i, (size, fill) in enumerate(zip(layout.sizes, layout.fills)):
        m = client.mappings[i]
        assert m.size == size
        t = client.backend.tensor(m.va, m.size)
        assert int(t.min()) == int(t.max()) == fill, f"allocation {i} changed"


class Pools(RuleBasedStateMachine):
    srv: ServerProcess  # set by the test below

    def __init__(self):
        super().__init__()
        self.path = self.srv.path
        self.writer: MemoryClient | None = None
        self.staged: Layout | None = None
        self.committed: Layout | None = None
        self.readers: list[MemoryClient] = []
        self.kv_owner: MemoryClient | None = None
        self.kv: Layout | None = None
        status = read_status(self.path)  # the previous example's teardown left a clean slate
        assert status["pools"]["weights"]["state"] == "EMPTY" and status["pools"]["kv"]["state"] == "EMPTY"
        # Bytes are compared to this baseline (0 unless an earlier example leaked, which its own
        # invariant reports), so a failing example replays the same way while it is shrunk.
        self.baseline = status["bytes_in_use"]

    # -- helpers ---------------------------------------------------------------
    def close(self, client: MemoryClient) -> None:
        """Close a client and wait until the server has released what it held."""
        session = client.session
        client.close()
        if session is not None:
            self.srv.wait_event("disconnected", timeout=WAIT, session=session)

    def try_client(self, pool: str, mode: str) -> MemoryClient | None:
        """A MemoryClient that tries the lock once; None if refused (which must be a timeout)."""
        try:
            return MemoryClient(self.path, pool, mode, timeout=0, name=f"sm-{pool}-{mode}")
        except MemoryServiceError as e:
            assert e.code == "timeout", e
            return None

    def weights_rw_free(self) -> bool:
        return self.writer is None and not self.readers

    def weights_ro_free(self) -> bool:
        return self.writer is None and self.committed is not None

    @staticmethod
    def allocate(client: MemoryClient, layout: Layout, size: int, fill: int) -> None:
        m = client.allocate(size, timeout=0)
        assert m.index == len(layout.sizes) and m.size == -(-size // (2 * MiB)) * (2 * MiB)
        client.backend.tensor(m.va, m.size).fill_(fill)
        layout.sizes.append(m.size)
        layout.fills.append(fill)
        assert client.layout.hash == layout.hash

    @staticmethod
    def set_metadata(client: MemoryClient, layout: Layout, data) -> None:
        tensors = {}
        if layout.sizes:
            for name in data.draw(st.lists(st.sampled_from("abc"), max_size=2, unique=True), label="names"):
                dtype = data.draw(st.sampled_from(["float32", "uint8", "bfloat16", "int64"]), label="dtype")
                alloc = data.draw(st.integers(0, len(layout.sizes) - 1), label="alloc")
                offset = data.draw(st.sampled_from([0, 256, 4096]), label="offset")
                numel = data.draw(st.integers(0, 1024), label="numel")
                tensors[name] = TensorMeta(alloc, offset, (numel,), (1,), dtype)
        extra = data.draw(st.dictionaries(st.sampled_from(["x", "y"]),
                                          st.integers(0, 9) | st.text("ab", max_size=3) | st.lists(st.integers(0, 3),
                                                                                                   max_size=2),
                                          max_size=2), label="extra")
        replace = data.draw(st.booleans(), label="replace")
        got = client.set_metadata(tensors, extra, replace=replace)
        if replace:
            layout.tensors, layout.extra = {}, {}
        layout.tensors.update(tensors)
        layout.extra.update(extra)
        assert got == layout.hash == client.layout.hash

    # -- weights: the writer -----------------------------------------------------
    @precondition(lambda self: self.writer is None)
    @rule(size=st.sampled_from(SIZES), fills=st.lists(st.integers(1, 255), max_size=2))
    def connect_writer(self, size, fills):
        c = self.try_client("weights", "rw")
        assert (c is not None) == self.weights_rw_free()
        if c is not None:
            assert c.layout.hash == EMPTY_HASH  # a writer stages a new layout from nothing
            self.writer, self.staged = c, Layout()
            for fill in fills:  # most writers start right away
                self.allocate(c, self.staged, size, fill)

    @precondition(lambda self: self.writer is not None and len(self.staged.sizes) < MAX_ALLOCS)
    @rule(size=st.sampled_from(SIZES), fill=st.integers(1, 255))
    def writer_allocate(self, size, fill):
        self.allocate(self.writer, self.staged, size, fill)

    @precondition(lambda self: self.writer is not None)
    @rule(data=st.data())
    def writer_set_metadata(self, data):
        self.set_metadata(self.writer, self.staged, data)

    @precondition(lambda self: self.writer is not None)
    @rule()
    def writer_commit(self):
        assert self.writer.commit() == self.staged.hash
        self.committed, self.staged = self.staged, None
        self.readers.append(self.writer)  # it stays on, as a reader
        self.writer = None

    @precondition(lambda self: self.writer is not None)
    @rule()
    def writer_reset(self):
        self.writer.reset()
        assert self.writer.layout.hash == EMPTY_HASH
        self.committed, self.staged = None, Layout()

    @precondition(lambda self: self.writer is not None)
    @rule()
    def writer_disconnects(self):
        """Without a commit: the staged layout is aborted, the committed one stays."""
        self.close(self.writer)
        self.writer, self.staged = None, None

    # -- weights: readers ----------------------------------------------------------
    @rule()
    def connect_reader(self):
        c = self.try_client("weights", "ro")
        assert (c is not None) == self.weights_ro_free()
        if c is not None:
            check_bytes(c, self.committed)
            self.readers.append(c)

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def disconnect_reader(self, data):
        c = self.readers.pop(data.draw(st.integers(0, len(self.readers) - 1), label="reader"))
        self.close(c)

    @precondition(lambda self: self.readers)
    @rule(data=st.data())
    def reader_cannot_write(self, data):
        c = data.draw(st.sampled_from(self.readers), label="reader")
        for attempt in (lambda: c.allocate(MiB, timeout=0), c.commit, c.reset,
                        lambda: c.set_metadata(extra={"x": 1})):
            with pytest.raises(MemoryServiceError) as e:
                attempt()
            assert e.value.code == "bad_state"
        check_bytes(c, self.committed)

    # -- kv: one owner at a time ---------------------------------------------------
    @rule()
    def connect_kv_owner(self):
        c = self.try_client("kv", "rw")
        assert (c is not None) == (self.kv_owner is None)
        if c is not None:
            if self.kv is None:
                self.kv = Layout()
            assert c.layout.hash == self.kv.hash  # adopted as the last owner left it
            check_bytes(c, self.kv)
            self.kv_owner = c

    @precondition(lambda self: self.kv_owner is not None and len(self.kv.sizes) < MAX_ALLOCS)
    @rule(size=st.sampled_from(SIZES), fill=st.integers(1, 255))
    def kv_allocate(self, size, fill):
        self.allocate(self.kv_owner, self.kv, size, fill)

    @precondition(lambda self: self.kv_owner is not None)
    @rule(data=st.data())
    def kv_set_metadata(self, data):
        self.set_metadata(self.kv_owner, self.kv, data)

    @precondition(lambda self: self.kv_owner is not None and self.kv.sizes)
    @rule(data=st.data(), fill=st.integers(1, 255))
    def kv_owner_writes(self, data, fill):
        i = data.draw(st.integers(0, len(self.kv.sizes) - 1), label="alloc")
        m = self.kv_owner.mappings[i]
        self.kv_owner.backend.tensor(m.va, m.size).fill_(fill)
        self.kv.fills[i] = fill

    @precondition(lambda self: self.kv_owner is not None)
    @rule()
    def kv_reset(self):
        self.kv_owner.reset()
        self.kv = Layout()
        assert self.kv_owner.layout.hash == EMPTY_HASH

    @precondition(lambda self: self.kv_owner is not None)
    @rule()
    def kv_commit_is_refused(self):
        with pytest.raises(MemoryServiceError) as e:
            self.kv_owner.commit()
        assert e.value.code == "bad_request"

    @precondition(lambda self: self.kv_owner is not None)
    @rule()
    def kv_owner_leaves(self):
        """Its layout (and memory) stays for the next owner, unless there is nothing to adopt."""
        self.close(self.kv_owner)
        self.kv_owner = None
        if not self.kv.sizes:
            self.kv = None

    # -- try-locks on raw sockets ----------------------------------------------------
    @rule(pool_mode=st.sampled_from([("weights", "rw"), ("weights", "ro"), ("kv", "rw"), ("kv", "ro")]))
    def try_lock_raw(self, pool_mode):
        """Hello with timeout=0: granted at once, or refused at once; never a change of state."""
        pool, mode = pool_mode
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(WAIT)
            s.connect(str(self.path))
            p.send_frame(s, p.Hello(pool, mode, 0.0, "sm-raw"))
            reply, fds = p.recv_frame(s)
            assert not fds
            if (pool, mode) == ("kv", "ro"):
                assert isinstance(reply, p.Error) and reply.code == "bad_request", reply
                return
            free = {("weights", "rw"): self.weights_rw_free(), ("weights", "ro"): self.weights_ro_free(),
                    ("kv", "rw"): self.kv_owner is None}[pool, mode]
            if not free:
                assert isinstance(reply, p.Error) and reply.code == "timeout", reply
                return
            assert isinstance(reply, p.Granted) and (reply.pool, reply.mode) == (pool, mode), reply
            expected = {("weights", "rw"): EMPTY_HASH,
                        ("weights", "ro"): self.committed.hash if self.committed else None,
                        ("kv", "rw"): self.kv.hash if self.kv else EMPTY_HASH}[pool, mode]
            assert reply.layout.hash == expected
        # closed: a writer with nothing staged aborts, a reader or an owner just leaves
        self.srv.wait_event("disconnected", timeout=WAIT, session=reply.session)

    # -- what the server says ----------------------------------------------------------
    @invariant()
    def status_matches_the_model(self):
        status = read_status(self.path)
        w, kv = status["pools"]["weights"], status["pools"]["kv"]

        if self.writer is not None:
            state, shown = "RW", self.staged
        elif self.committed is None:
            state, shown = "EMPTY", None
        else:
            state, shown = ("RO" if self.readers else "COMMITTED"), self.committed
        assert w["state"] == state
        assert (w["writer"] or {}).get("id") == (self.writer.session if self.writer else None)
        assert w["readers"] == sorted(c.session for c in self.readers)
        assert w["allocations"] == (len(shown.sizes) if shown else 0)
        assert w["bytes"] == (sum(shown.sizes) if shown else 0)
        assert w["layout_hash"] == (shown.hash if shown else None)
        assert w["committed_hash"] == (self.committed.hash if self.committed else None)
        assert w["waiting_writers"] == w["waiting_readers"] == 0

        assert kv["state"] == ("RW" if self.kv_owner else "EMPTY" if self.kv is None else "COMMITTED")
        assert (kv["writer"] or {}).get("id") == (self.kv_owner.session if self.kv_owner else None)
        assert kv["readers"] == []
        assert kv["allocations"] == (len(self.kv.sizes) if self.kv else 0)
        assert kv["layout_hash"] == (self.kv.hash if self.kv else None)
        assert kv["committed_hash"] is None

        layouts = [self.staged, self.committed, self.kv]
        assert status["bytes_in_use"] - self.baseline == sum(sum(x.sizes) for x in layouts if x is not None)

    # -- a clean slate for the next example ----------------------------------------------
    def teardown(self):
        for c in [self.writer, self.kv_owner, *self.readers]:
            if c is not None:
                self.close(c)
        for pool in ("weights", "kv"):
            c = MemoryClient(self.path, pool, "rw", timeout=WAIT, name="sm-cleaner")
            c.reset()
            self.close(c)
        status = read_status(self.path)
        assert status["pools"]["weights"]["state"] == "EMPTY" and status["pools"]["kv"]["state"] == "EMPTY"
        assert status["bytes_in_use"] == self.baseline


@pytest.fixture
def machine_server():
    d = Path(tempfile.mkdtemp(prefix="us-", dir="/tmp"))
    srv = ServerProcess.start(BACKEND, d)
    yield srv
    srv.stop()
    shutil.rmtree(d, ignore_errors=True)


def test_pools_follow_their_state_machines(machine_server):
    Pools.srv = machine_server
    run_state_machine_as_test(Pools, settings=settings(
        max_examples=50, stateful_step_count=40, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    assert machine_server.proc.poll() is None
    assert read_status(machine_server.path)["bytes_in_use"] == 0  # nothing leaked, over all examples
    assert machine_server.events("internal") == []
