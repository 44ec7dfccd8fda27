"""`understudy serve --tensor-parallel N`: the leader (rank 0) of a group of N ranks, one process per device.

The leader is the engine the rest of understudy knows: HTTP server, scheduler, sampler, lifecycle,
failover lock. It starts ranks 1..N-1 as worker processes (parallel/rank.py) tied to it (PR_SET_PDEATHSIG
and a control channel whose EOF ends them), each on device `--device + rank` with that device's
memory service, where each rank publishes or imports its own shard and owns its device's kv pool.

A step: the leader schedules, sends the step's inputs (token ids, query and context lengths, block
tables) to every worker over its control channel, and all ranks run the forward; the row-parallel
layers sum across ranks (gloo on the CPU, NCCL on CUDA). Only the leader computes logits and samples.

Failure: a group with a dead rank is wedged (its next collective never completes), so any rank dying
ends the whole group. The leader watches every worker's control channel, which hangs up the moment the
worker dies; then it kills the others, lets go of the failover lock and exits (exit code 4). A dead
leader's channels hang up as fast, and its workers exit (and PR_SET_PDEATHSIG kills them anyway). A step
that fails on the leader (or hangs: the watchdog) fails it as it fails one engine (serving/faults.py, exit
code 5, 6 or 7), and the leader kills its workers first (GroupEngine.abandon).
A standby group (`--role shadow`) imports every rank's shard read-only and warms up on scratch KV;
only its leader waits on the node's failover lock and, once it has it, tells its workers to adopt
their devices' kv pools (in parallel with its own) before going ACTIVE.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NoReturn

import torch

from understudy.engine.core.kv_cache import KVCache
from understudy.engine.core.constraints import Constraints
from understudy.engine.core.llm_engine import LLMEngine
from understudy.engine.model import weights
from understudy.engine.model.sharding import check_shardable
from understudy.engine.parallel.comm import Channel, exit_now, join, make_store, pdeathsig_kill
from understudy.engine.serve_config import ServeConfig
from understudy.engine.serving.bootstrap import (
    Built,
    engine_limits,
    finish,
    kv_spec,
    open_kv,
    place,
    start_engine,
)
from understudy.failover import exit_codes
from understudy.fds import lift_socket
from understudy.logs import log
from understudy.memory.tensors import dtype_name

logger = logging.getLogger("understudy.engine.parallel.group")


class GroupError(RuntimeError):
    """A worker answered a request with an error."""


class RankProcess:
    """A worker: started by us on this node (proc), or a rank on another node that joined over TCP (proc is
    None; its pid is on its node)."""

    def __init__(self, rank: int, proc: subprocess.Popen | None, channel: Channel, pid: int | None = None):
        self.rank, self.proc, self.channel = rank, proc, channel
        self.pid = proc.pid if proc is not None else pid

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def kill(self) -> None:
        """SIGKILL a local worker; a remote one gets its connection shut, reads EOF and exits (rank.py)."""
        if self.proc is None:
            try:
                self.channel.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Group:
    """The leader's view of its workers: start them, talk to them, die with them."""

    def __init__(self, size: int):
        self.size = size
        self.workers: list[RankProcess] = []
        self.closing = False  # the leader is exiting normally: workers leaving is expected
        self.stepping = False  # a step's inputs went out: the ranks are inside the same forward
        self.tp = None  # this rank's TensorParallel (comm.join), once the group has joined
        self._fatal = threading.Lock()
        self._calls = threading.Lock()  # one request/reply exchange at a time
        # Let go of on a fatal exit before the process exits: a CUDA process takes a while to tear
        # down, and the standby group must not wait for that to get the failover lock.
        self.holds: list = []
        atexit.register(self._close)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers]

    def start(self, plan: dict, local: int | None = None, remote=None, join_timeout: float = 600.0) -> None:
        """Start ranks 1..local-1 on this node (call from the main thread: PR_SET_PDEATHSIG fires when the
        thread that started the child exits), take ranks local..size-1 from other nodes as they join
        (`remote`: parallel/nodes.RemoteRanks), and send each its part of the plan."""
        local = self.size if local is None else local
        for rank in range(1, local):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            cmd = [sys.executable, "-m", "understudy.engine.parallel.rank", "--control-fd", str(theirs.fileno()),
                   "--leader-pid", str(os.getpid())]
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                                    preexec_fn=pdeathsig_kill)
            theirs.close()
            worker = RankProcess(rank, proc, Channel(lift_socket(ours)))  # our death: the worker's EOF at once
            self.workers.append(worker)
            threading.Thread(target=self._watch, args=(worker,), name=f"tp-watch-{rank}", daemon=True).start()
            worker.channel.send(("init", {**plan, "rank": rank}))
        if remote is not None:
            for rank, (channel, pid) in sorted(remote.accept(set(range(local, self.size)), join_timeout).items()):
                worker = RankProcess(rank, None, channel, pid)
                self.workers.append(worker)
                threading.Thread(target=self._watch, args=(worker,), name=f"tp-watch-{rank}", daemon=True).start()
                worker.channel.send(("init", {**plan, "rank": rank}))

    def lost_worker(self, within: float) -> RankProcess | None:
        """A worker whose channel has hung up, waiting up to `within` seconds for one. A collective that
        failed usually means a rank died, and its channel says so in the same instant: the group then ends
        as for a lost rank (exit 4), not as a step error."""
        poller = select.poll()
        by_fd = {w.channel.sock.fileno(): w for w in self.workers}
        for fd in by_fd:
            poller.register(fd, select.POLLRDHUP)
        events = poller.poll(within * 1000)
        return by_fd[events[0][0]] if events else None  # (Channel.closed is the same check for one channel)

    def _watch(self, worker: RankProcess) -> None:
        # The worker's end of the channel is lifted above its driver files (fds.py), so it hangs up the
        # moment the worker dies; waitpid would tell only once the driver has torn its GPU context down.
        worker.channel.wait_closed()
        if not self.closing:
            self.fatal("tp_rank_lost", rank=worker.rank, pid=worker.pid, returncode=worker.returncode(),
                       remote=worker.proc is None)

    def abandon(self) -> None:
        """The group ends: kill every worker now (their kv sessions go with them). Their channels hanging up
        is expected from here on."""
        self.closing = True
        for w in self.workers:
            w.kill()

    def fatal(self, event: str, **fields) -> None:
        """The group is wedged: kill every worker, let go of the failover lock and exit now."""
        with self._fatal:
            self.closing = True
            log(logger, event, logging.ERROR, **fields,
                note="a tensor-parallel group with a dead rank cannot go on: the whole group exits")
            self.abandon()
            for hold in self.holds:
                hold.release()
            exit_now(exit_codes.GROUP_LOST)

    def _close(self) -> None:
        self.closing = True

    # -- messages ----------------------------------------------------------------------------------
    def send_all(self, msg) -> None:
        for w in self.workers:
            try:
                w.channel.send(msg)
            except OSError as e:  # its end is gone: the rank died (the watcher is about to say so)
                self.fatal("tp_rank_lost", rank=w.rank, pid=w.pid, error=str(e))

    def recv_all(self) -> list[dict]:
        replies = []
        for w in self.workers:
            try:
                kind, body = w.channel.recv()
            except (OSError, EOFError) as e:
                self.fatal("tp_rank_lost", rank=w.rank, pid=w.pid, error=str(e))
            if kind == "error":
                raise GroupError(f"rank {w.rank} (pid {w.pid}): {body}")
            replies.append(body)
        return replies

    def call(self, *msg) -> list[dict]:
        with self._calls:
            self.send_all(msg)
            return self.recv_all()

    def step(self, input_ids: list[int], query_lens: list[int], context_lens: list[int],
             tables: list[list[int]], graph: bool, ids=None) -> None:
        """LLMEngine.step_hook: the other ranks run this step's forward (or replay its graph) with us. ids: the
        new tokens of a decode step queued ahead, on our device only (sampled by the step before): the ranks
        take them from a broadcast, input_ids being placeholders."""
        self.send_all(("step", input_ids, query_lens, context_lens, tables, graph, ids is not None))
        self.stepping = True
        if ids is not None:
            self.tp.broadcast(ids.contiguous())  # (the source: not written)


class GroupEngine(LLMEngine):
    """The leader's engine: every step runs on all ranks, eager or replayed from their CUDA graphs."""

    def __init__(self, group: Group, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.group = group
        self.step_hook = group.step

    def enable_cuda_graphs(self, mixed_steps: bool = False) -> None:
        """Every rank captures the same buckets at once: the forward run before each capture does its
        all-reduces for real, so the ranks go through them together."""
        with self.group._calls:
            self.group.send_all(("graphs", self.graph_shape(mixed_steps)))
            super().enable_cuda_graphs(mixed_steps)
            self.group.recv_all()

    def _forward_eager(self, batch, rows, ids=None):
        return self._on_all_ranks(super()._forward_eager, batch, rows, ids)

    def _forward_graph(self, batch, rows, bucket, ids=None):
        return self._on_all_ranks(super()._forward_graph, batch, rows, bucket, ids)

    def abandon(self) -> None:
        """A failed leader (serving/faults.py): the whole group ends with it, now."""
        self.group.abandon()

    def _on_all_ranks(self, forward, batch, *args):
        self.group.stepping = False
        try:
            return forward(batch, *args)
        except BaseException as e:
            if (dead := self.group.lost_worker(within=1.0)) is not None:  # the collective failed: a rank died
                self.group.fatal("tp_rank_lost", rank=dead.rank, pid=dead.pid, returncode=dead.returncode(),
                                 remote=dead.proc is None, error=f"{type(e).__name__}: {e}")
            if self.group.stepping:  # the workers are inside this forward: the ranks are out of step now
                log(logger, "tp_step_failed", logging.ERROR, error=f"{type(e).__name__}: {e}",
                    note="the workers are inside this step: the whole group ends")
                self.group.abandon()  # then the leader fails as one engine does (serving/faults.py)
            raise
        finally:
            self.group.stepping = False


class GroupKVCache(KVCache):
    """The leader's KV cache; parking and adopting the kv pools are group operations."""

    group: Group

    def park(self) -> None:
        scratch = self._scratch is not None
        super().park()
        if scratch:
            self.group.call("park")

    def adopt(self, socket_path: str, timeout: float = 60.0, name: str = "engine") -> float:
        """Promotion: every rank maps its device's kv pool at once (the leader's own in parallel with the
        workers'). If any rank could not adopt its pool's blocks, no rank's cached prefix is trusted."""
        t0 = time.perf_counter()
        self.park()  # nothing to do when parked already (the usual case); never inside the exchange below
        with self.group._calls:
            self.group.send_all(("adopt", timeout))
            seconds = super().adopt(socket_path, timeout, name)
            replies = self.group.recv_all()
        adopted = [self.adopted, *(r["adopted"] for r in replies)]
        if not all(adopted):
            self._forget_blocks()
        log(logger, "tp_group_adopted", adopted=adopted, rank_seconds=[round(seconds, 4)] + [
            round(r["seconds"], 4) for r in replies], seconds=round(time.perf_counter() - t0, 4))
        return time.perf_counter() - t0

    def _forget_blocks(self) -> None:
        """Some rank's pool did not hold our blocks: the group's cache starts empty on every rank."""
        self.adopted = False
        self.index.zero_()


def _plan(config: ServeConfig, model_path: Path, backend: str, dtype: torch.dtype, attention: str,
          port: int) -> dict:
    """What a worker needs to become rank r (it adds its own rank)."""
    d = config.device
    return {"size": d.tensor_parallel, "port": port, "model": str(model_path), "dtype": dtype_name(dtype),
            "backend": backend, "device0": d.device, "attention": attention,
            "prefill_attention": config.model.prefill_attention, "socket_dir": d.socket_dir,
            "memory_service": d.memory_service, "timeout": 600.0, "leader_pid": os.getpid(),
            "log_format": config.output.log_format, "log_level": config.output.log_level}


def as_leader(serve: Callable[[ServeConfig], int], config: ServeConfig) -> NoReturn:
    """Run `serve` as a group's leader, then leave as the ranks do (tp.exit_now), whether it drained, was
    refused (one line that says why) or failed: its workers read EOF and exit."""
    try:
        code = serve(config)
    except SystemExit as e:  # a refusal that says why (understudy serve: ...)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        code = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - logged, then the group ends
        logger.error("tp_group_failed", exc_info=e)
        code = 1
    exit_now(code)


def build_group(config: ServeConfig) -> Built:
    """launch.build_engine for --tensor-parallel N > 1: the leader's engine over a group of N ranks."""
    size = config.device.tensor_parallel
    role = config.failover.role

    def shardable(model_config) -> None:
        try:
            check_shardable(model_config, size)
        except ValueError as e:
            raise SystemExit(f"understudy serve: {e}") from None

    d = config.device
    local = size // d.nnodes  # ranks on this node (the leader's); the others join from their nodes
    p = place(config, ranks=local, check_config=shardable)
    model_path, model_config, dtype, path, backend, device = (
        p.model_path, p.config, p.dtype, p.socket_path, p.backend, p.device)
    lock, attention_fn = p.lock, p.attention_fn
    t0 = time.perf_counter()
    remote = None
    if d.nnodes > 1:  # the store at --master-addr:--master-port, where the other nodes' ranks find us
        from understudy.engine.parallel.nodes import RemoteRanks

        store = make_store(0, size, d.master_port, host=d.master_addr)
        remote = RemoteRanks(store, d.master_addr)
    else:
        store = make_store(0, size)
    group = Group(size)
    group.holds.append(lock)
    group.start(_plan(config, model_path, backend, dtype, "reference" if attention_fn is None else "triton",
                      store.port), local=local, remote=remote)
    log(logger, "tp_group_started", size=size, ranks={0: os.getpid(), **{w.rank: w.pid for w in group.workers}},
        devices=list(range(d.device, d.device + local)), store_port=store.port, nnodes=d.nnodes)
    tp = join(store, 0, size, device)  # every rank loads its shard meanwhile
    group.tp = tp
    model, weights_client, stats = weights.load(path, model_path, model_config, dtype,
                                                progress=not config.output.no_progress,
                                                name=f"engine-{os.getpid()}", attention_fn=attention_fn, tp=tp)
    loaded = group.call("loaded?")
    # The same number of blocks on every rank: on CUDA the fullest device decides.
    spec = kv_spec(config, model.config, p, ranks_memory=loaded)
    kv = open_kv(GroupKVCache, role, path, spec, weights_client.backend)
    spec = kv.spec
    kv.group = group
    replies = group.call("kv", asdict(spec), role)
    if role == "primary" and not all([kv.adopted, *(r["adopted"] for r in replies)]):
        kv._forget_blocks()
    tokenizer, eos, limits = engine_limits(config, model_path, model_config)
    constraints = Constraints(tokenizer, model_config.vocab_size, eos, device=device)  # the leader samples
    engine = GroupEngine(group, model, kv, eos_token_ids=eos, limits=limits, device=device, constraints=constraints)
    start_engine(config, engine, p)  # every rank captures its graphs and warms up with the leader
    group.call("warmed")
    return finish(config, engine, p, tokenizer, weights_client, stats, t0, {
        "tensor_parallel": size, "rank_pids": [os.getpid(), *group.pids],
        "rank_weights": [stats["source"], *(r["weights"] for r in loaded)]})
