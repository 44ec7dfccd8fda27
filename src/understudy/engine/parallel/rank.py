"""A worker rank (1..N-1) of a tensor-parallel group: `python -m understudy.engine.parallel.rank` (started by
the group's leader, parallel/group.py; not a command for people).

It does what the leader asks over the control channel, in order:
    init      (first) device, memory service, torch.distributed, then publish or import its shard
    loaded?   answers with how its weights arrived (and its device's free memory on CUDA)
    kv        takes its device's kv pool (a primary) or maps a scratch KV of the same shape (a shadow)
    graphs    captures the steps' CUDA graphs, bucket by bucket, with the other ranks
    step      runs the decoder layers on the step's inputs with the other ranks, eagerly or by replaying
              the graph of a decode step (no logits: the leader samples)
    warmed    warm-up is over: give cached device memory back
    park      a shadow drops its scratch KV (its address range stays reserved)
    adopt     promotion: map its device's kv pool at those addresses
It exits when the control channel closes (the leader is gone) and dies with the leader (PR_SET_PDEATHSIG);
it ignores SIGTERM/SIGINT, so that a draining leader keeps its ranks until its last request.

Like a single engine (memory_watch.py), a rank outlives its device's memory service: it serves on from
its mappings and gives a restarted service its shard and, if it owns it, its kv pool back (a thread).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from types import SimpleNamespace

logger = logging.getLogger("understudy.engine.parallel.rank")


class _RankTag(logging.Filter):
    """Every log line of this process names its rank (they share the leader's stderr)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.fields = {**getattr(record, "fields", {}), "tp_rank": self.rank, "pid": os.getpid()}
        return True


class Rank:
    def __init__(self, plan: dict, store=None):
        import torch

        from understudy.engine.model import weights
        from understudy.engine.model.loader import load_config
        from understudy.engine.parallel.comm import join, make_store
        from understudy.engine.serving.bootstrap import ensure_memory_service
        from understudy.memory.tensors import dtype_of

        self.plan = plan
        self.rank, size = plan["rank"], plan["size"]
        device_index = plan["device0"] + plan.get("local_rank", self.rank)  # its device on its own node
        use_cuda = plan["backend"] == "cuda"
        self.device = torch.device(f"cuda:{device_index}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self.name = f"engine-{plan['leader_pid']}-rank{self.rank}"
        self.socket_path, self.memory_server = ensure_memory_service(plan["backend"], device_index,
                                                                     plan["socket_dir"], plan["memory_service"])
        self.tp = join(store or make_store(self.rank, size, plan["port"]), self.rank, size, self.device)
        attention_fn = None
        if plan["attention"] == "triton":
            from understudy.engine.layers.triton_attention import attention_for

            attention_fn = attention_for(plan["prefill_attention"])
        config = load_config(plan["model"])
        self.model, self.weights, self.stats = weights.load(
            self.socket_path, plan["model"], config, dtype_of(plan["dtype"]), progress=False, name=self.name,
            attention_fn=attention_fn, tp=self.tp, timeout=plan["timeout"])
        self.kv = None
        self.graphs = None  # StepGraphs, once the leader asks for them
        self.pools = threading.Lock()  # taking / adopting the kv pool vs giving a restarted service our memory
        threading.Thread(target=self._watch_memory_service, name="memory-watch", daemon=True).start()

    def _watch_memory_service(self) -> None:
        """memory_watch.py's watch for a rank (no event loop here): wait for the service to go away, then for
        the next one on the same socket, and give it back what this rank maps."""
        from understudy.engine.serving.memory_watch import RETRY_MAX, give_back, retry_delays
        from understudy.logs import log

        lost_at = None
        while True:
            delays = retry_delays()
            while True:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                sock.settimeout(RETRY_MAX)
                try:
                    sock.connect(self.socket_path)
                    sock.settimeout(None)
                    break
                except OSError:
                    sock.close()
                time.sleep(next(delays))  # a standby takes over at once, a restarted service takes a while
            try:
                if lost_at is not None:
                    with self.pools:
                        outcome = give_back(SimpleNamespace(weights=self.weights, engine=SimpleNamespace(
                            engine=SimpleNamespace(kv=self.kv or SimpleNamespace(client=None)))))
                    failed = any(str(v).startswith("refused") for v in outcome.values())
                    log(logger, "memory_service_recovered", logging.ERROR if failed else logging.INFO,
                        seconds=round(time.monotonic() - lost_at, 3), **outcome)
                try:
                    while sock.recv(1 << 12):  # the service never writes: readable only at EOF
                        pass
                except OSError:
                    pass
            except OSError as e:  # it went away again while we gave back: wait for the next one
                log(logger, "memory_service_recovery_interrupted", logging.WARNING, error=str(e))
            finally:
                sock.close()
            lost_at = time.monotonic()
            log(logger, "memory_service_lost", logging.WARNING, socket=self.socket_path,
                note="serving on from our mappings; waiting for a restarted service")

    def loaded(self) -> dict:
        import torch

        out = {"weights": self.stats["source"], "pid": os.getpid()}
        if self.device.type == "cuda":
            out["free"], out["total"] = torch.cuda.mem_get_info(self.device)
        return out

    def take_kv(self, spec: dict, role: str) -> dict:
        from understudy.engine.core.kv_cache import KVCache, KVSpec

        spec = KVSpec(**spec)
        with self.pools:
            if role == "primary":
                self.kv = KVCache.from_memory_service(self.socket_path, spec, name=self.name)
            else:
                self.kv = KVCache.scratch(self.weights.backend, spec)
        return {"adopted": self.kv.adopted}

    def capture_graphs(self, shape: dict) -> dict:
        from understudy.engine.core.cuda_graphs import StepGraphs

        self.graphs = StepGraphs(self.model, self.kv.layers, **shape, device=self.device, logits=False)
        self.graphs.capture()
        return {}

    def step(self, input_ids: list[int], query_lens: list[int], context_lens: list[int],
             tables: list[list[int]], graph: bool, ids_from_leader: bool = False) -> None:
        """The leader's forward, minus the logits (engine.LLMEngine._forward_eager / _forward_graph).
        ids_from_leader: a decode step the leader queued ahead, whose new tokens (sampled by the step before,
        on the leader's device) come by broadcast; input_ids are placeholders."""
        import torch

        from understudy.engine.core.host_copies import to_device
        from understudy.engine.layers.attention import AttentionMetadata

        ids = None
        if ids_from_leader:
            ids = torch.empty(len(query_lens), dtype=torch.long, device=self.device)
            self.tp.broadcast(ids)
        if graph:
            self.graphs.run(input_ids, query_lens, context_lens, tables, logits_at=[], device_ids=ids)
            return
        meta = AttentionMetadata.build(query_lens, context_lens, tables, self.kv.spec.block_size, device=self.device)
        if ids is None:
            ids = to_device(input_ids, self.device, torch.long)  # (no stream sync: queued behind the step before)
        with torch.inference_mode():
            self.model.model(ids, meta.positions(), meta, self.kv.layers)

    def warmed(self) -> dict:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # a parked standby rank keeps as little device memory of its own as it can
        return {}

    def park(self) -> dict:
        self.kv.park()
        return {}

    def adopt(self, timeout: float) -> dict:
        with self.pools:
            seconds = self.kv.adopt(self.socket_path, timeout=timeout, name=self.name)
        return {"adopted": self.kv.adopted, "seconds": seconds}


def serve_leader(channel, rank: Rank) -> None:
    """Answer the leader until it goes away."""
    calls = {"loaded?": rank.loaded, "kv": rank.take_kv, "graphs": rank.capture_graphs, "warmed": rank.warmed,
             "park": rank.park, "adopt": rank.adopt}
    while True:
        msg = channel.recv()  # EOFError: the leader is gone
        if msg[0] == "step":
            rank.step(*msg[1:])
            continue
        try:
            reply = ("ok", calls[msg[0]](*msg[1:]))
        except Exception as e:  # the leader says why it cannot go on; this rank stays for it to decide
            logger.exception("tp_request_failed")
            reply = ("error", f"{msg[0]}: {type(e).__name__}: {e}")
        channel.send(reply)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m understudy.engine.parallel.rank",
                                 description="A worker rank of a tensor-parallel group (started by its leader).")
    ap.add_argument("--control-fd", type=int, help="this end of the leader's control socketpair (a rank on the "
                                                   "leader's node)")
    ap.add_argument("--leader-pid", type=int, help="the leader's pid (we exit if it is gone)")
    ap.add_argument("--join", metavar="HOST:PORT", help="a rank on another node: the group's store (--master-addr "
                                                        ":--master-port), where the leader's control address is")
    ap.add_argument("--rank", type=int, help="with --join: this rank")
    ap.add_argument("--size", type=int, help="with --join: the group's size")
    ap.add_argument("--node-rank", type=int, help="with --join: this node")
    ap.add_argument("--local-rank", type=int, help="with --join: this rank's device is --device + LOCAL_RANK")
    ap.add_argument("--member-pid", type=int, help="with --join: the node's member process (we exit if it is gone)")
    ap.add_argument("--local-plan", default="{}", help="with --join: JSON of what this node decides (device, "
                                                       "socket directory, model path)")
    args = ap.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGINT):  # the leader decides when the group stops (after a drain)
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() != (args.member_pid if args.join else args.leader_pid):  # it died before PR_SET_PDEATHSIG
        return 1
    from understudy.engine.parallel.comm import Channel, exit_now
    from understudy.fds import lift
    from understudy.logs import log, setup_logging

    store, local = None, {}
    if args.join:  # a rank on another node: rendezvous through the store, then the leader's control listener
        from datetime import timedelta

        from understudy.engine.parallel.comm import make_store
        from understudy.engine.parallel.nodes import connect_to_leader

        host, port = args.join.rsplit(":", 1)
        # The leader may still be starting (a standby group forms while `up` restarts both nodes' parts).
        store = make_store(args.rank, args.size, int(port), host=host, timeout=timedelta(seconds=600))
        channel = connect_to_leader(store, args.rank, args.node_rank)
        local = {**json.loads(args.local_plan), "local_rank": args.local_rank}
    else:
        # Lifted above the driver files CUDA will open: if we die, the leader hears it at once (fds.py).
        channel = Channel(socket.socket(fileno=lift(args.control_fd)))
    try:
        kind, plan = channel.recv()
    except EOFError:
        return 1
    assert kind == "init", kind
    plan = {**plan, **{k: v for k, v in local.items() if v is not None or k == "socket_dir"}}
    setup_logging(plan["log_format"], plan["log_level"])
    logging.getLogger("understudy").handlers[0].addFilter(_RankTag(plan["rank"]))
    t0 = time.perf_counter()
    try:
        rank = Rank(plan, store)
        log(logger, "tp_rank_ready", rank=plan["rank"], weights=rank.stats["source"],
            seconds=round(time.perf_counter() - t0, 3))
        serve_leader(channel, rank)
    except EOFError:  # the leader closed the channel: it exited (normally or not), so do we, now: an
        # interpreter shutdown would first tear down NCCL and CUDA while our kv session still holds the pool
        # the next group's rank waits to adopt
        exit_now(0)
    except BaseException as e:  # a failure of this rank ends the group (the leader sees us exit)
        if channel.closed(within=1.0):  # a collective failed because the leader died (a remote rank has
            # no PR_SET_PDEATHSIG tying it to the leader): leave as for its EOF
            log(logger, "tp_leader_lost", error=f"{type(e).__name__}: {e}")
            exit_now(0)
        logger.exception("tp_rank_failed")
        try:
            channel.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        except OSError:
            pass
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
