"""Tensor parallelism: how one decoder is cut into N ranks (Megatron style), one process per device.

A rank runs the same `CausalLM` as a single-device engine, built from a *rank config*: the
model's config with a 1/N share of the query heads, the KV heads and the MLP width. So each
rank's parameters already have its shard's shapes, under the checkpoint's names:

    q_proj, k_proj, v_proj, gate_proj, up_proj   column-parallel: rows [r*n/N, (r+1)*n/N) (biases too)
    o_proj, down_proj                            row-parallel: columns of the same range; their partial
                                                 outputs are summed across ranks (all-reduce), the bias
                                                 is added once, after the sum
    embeddings, norms, lm_head, q_norm/k_norm    replicated

Attention heads never cross ranks: rank r holds query heads [r*H/N, (r+1)*H/N) and the KV heads
they read, so the paged KV cache of a rank holds only its KV heads (its own device's kv pool).
After the last layer every rank holds the whole hidden state; only the leader computes logits.

`TensorParallel` is the hook the model calls (`model.py`: `Attention.tp`, `MLP.tp`); the process
model (leader + workers, control channel, group failover) lives in tp_group.py and tp_worker.py.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import socket
import struct
import sys
import threading
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Callable, NoReturn

import torch

from .config import ModelConfig

# Collectives of a step finish in milliseconds; a peer that stopped answering is detected through its
# process (tp_group.py) long before this. It only bounds a rank that hangs without dying.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)

COLUMN = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
          "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias")
ROW = ("self_attn.o_proj.weight", "mlp.down_proj.weight")


def exit_now(code: int) -> NoReturn:
    """Leave the process at once, logs flushed, skipping the interpreter's teardown: a rank's peers may be
    gone already, and tearing down NCCL communicators (and CUDA graphs holding their kernels) whose peers
    are gone can block; the kernel releases our files, the failover lock and the memory sessions anyway."""
    for handler in logging.getLogger("understudy").handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the group and the all-reduce the row-parallel layers call."""

    rank: int
    size: int
    all_reduce: Callable[[torch.Tensor], None]  # in place: the sum over the group's ranks


def check_shardable(config: ModelConfig, size: int) -> None:
    """Raise ValueError (saying why) if the model cannot be cut into `size` ranks."""
    problems = []
    for what, n in (("attention heads", config.num_attention_heads), ("KV heads", config.num_key_value_heads),
                    ("intermediate size", config.intermediate_size)):
        if n % size:
            problems.append(f"{n} {what}")
    if problems:
        raise ValueError(f"--tensor-parallel {size} does not divide the model's {', '.join(problems)}")


def rank_config(config: ModelConfig, size: int) -> ModelConfig:
    """The config of one rank's share: same hidden size and vocabulary, 1/size of the heads and MLP."""
    if size == 1:
        return config
    check_shardable(config, size)
    return replace(config, num_attention_heads=config.num_attention_heads // size,
                   num_key_value_heads=config.num_key_value_heads // size,
                   intermediate_size=config.intermediate_size // size)


def shard_dim(name: str) -> int | None:
    """The dimension a checkpoint tensor is cut along (0 or 1), None if every rank holds all of it."""
    if name.endswith(COLUMN):
        return 0
    if name.endswith(ROW):
        return 1
    return None


def shard_range(full: int, rank: int, size: int) -> tuple[int, int]:
    n = full // size
    return rank * n, (rank + 1) * n


def shard_tensor(name: str, tensor: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full checkpoint tensor (a view; the tensor itself if replicated)."""
    dim = shard_dim(name) if size > 1 else None
    if dim is None:
        return tensor
    start, stop = shard_range(tensor.shape[dim], rank, size)
    return tensor.narrow(dim, start, stop - start)


def install(model: torch.nn.Module, tp: TensorParallel | None) -> None:
    """Give the model's row-parallel layers (attention output, MLP down) the group's all-reduce."""
    from .model import MLP, Attention

    for module in model.modules():
        if isinstance(module, (Attention, MLP)):
            module.tp = tp


def dist_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def make_store(rank: int, size: int, port: int = 0):
    """The group's rendezvous: rank 0 hosts a TCP store on loopback (port 0: any free one, see
    `store.port`), the other ranks connect to it."""
    import torch.distributed as dist

    # All ranks of a group are on this host: talk over loopback (gloo otherwise resolves the host name,
    # which may name an interface the others cannot reach).
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return dist.TCPStore("127.0.0.1", port, world_size=size, is_master=rank == 0, timeout=COLLECTIVE_TIMEOUT,
                         wait_for_workers=False)


def join(store, rank: int, size: int, device: torch.device) -> TensorParallel:
    """init_process_group over `store` (blocks until every rank joined, on gloo)."""
    import torch.distributed as dist

    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(dist_backend(device), store=store, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT, **kwargs)

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)

    return TensorParallel(rank, size, all_reduce)


# -- the group's control channel -------------------------------------------------------------------------

class Channel:
    """Length-prefixed pickled messages over one end of a socketpair between the leader and a worker.

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
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise EOFError("the other end of the group's control channel closed")
            buf += chunk
        return bytes(buf)

    def wait_closed(self) -> None:
        """Block until the other end is closed (its process exited or died), reading nothing."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLRDHUP)  # POLLHUP, POLLERR, POLLNVAL come anyway
        while not poller.poll():
            pass

    def close(self) -> None:
        self.sock.close()
