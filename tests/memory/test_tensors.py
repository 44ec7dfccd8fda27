"""Tensors over mapped memory: any dtype/shape/stride, zero copies, stable addresses."""

from __future__ import annotations

import pytest
import torch

from understudy.memory import (LayoutChanged, MemoryClient, TensorMeta, materialize_module, plan_layout,
                               publish_module, publish_state_dict)
from understudy.memory.tensors import dtype_name

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8, torch.bool,
          torch.float8_e4m3fn]


def _device(client: MemoryClient) -> str:
    return "cuda" if client.backend.name == "cuda" else "cpu"


def _random(shape, dtype, gen):
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -100), min(info.max, 100), shape, generator=gen, dtype=torch.int64).to(dtype)


def test_every_dtype_round_trips_through_publish_and_read(server):
    gen = torch.Generator().manual_seed(0)
    sd = {f"t.{dtype_name(d)}": _random((3, 5, 7), d, gen) for d in DTYPES}
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.empty(0, 4)
    with MemoryClient(server.path, "weights", "rw") as w:
        publish_state_dict(w, sd, progress=False)
        with MemoryClient(server.path, "weights", "ro") as r:
            r.map_all()
            for name, t in sd.items():
                got = r.tensor(name)
                assert got.dtype == t.dtype and got.shape == t.shape
                # compare bytes: float8 has no equality kernel on every device
                assert torch.equal(got.cpu().reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_strided_metadata_views_the_same_bytes_without_copy(server):
    with MemoryClient(server.path, "weights", "rw") as w:
        m = w.allocate(1 << 20)
        base = w.backend.tensor(m.va, m.size)
        base[:4096].copy_(torch.arange(4096, dtype=torch.int64).to(torch.uint8).to(base.device))
        base[512:1024].view(torch.float32).copy_(torch.arange(128, dtype=torch.float32))
        # a transposed (column-major) 16x8 float32 matrix at byte offset 512
        w.set_metadata({"colmajor": TensorMeta(0, 512, (16, 8), (1, 16), "float32"),
                        "every_other": TensorMeta(0, 1024, (10,), (2,), "int16")})
        colmajor = w.tensor("colmajor")
        assert colmajor.stride() == (1, 16) and colmajor.data_ptr() == m.va + 512
        expect = base[512:512 + 16 * 8 * 4].view(torch.float32).view(8, 16).t()
        assert torch.equal(colmajor, expect)
        colmajor[3, 2] = 42.0  # writes land in the shared bytes (zero copy)
        assert base[512:].view(torch.float32)[2 * 16 + 3].item() == 42.0
        assert torch.equal(w.tensor("every_other"), base[1024:1064].view(torch.int16)[::2])


def test_plan_layout_packs_tensors_into_few_aligned_allocations():
    specs = {f"w{i}": ((1000, 1000), torch.float32) for i in range(10)}  # 4 MB each
    sizes, metas = plan_layout(specs, granularity=2 << 20, chunk_bytes=16 << 20)
    assert len(sizes) == 3  # 4 per 16 MiB chunk
    assert all(s % (2 << 20) == 0 for s in sizes)
    assert all(m.offset % 256 == 0 for m in metas.values())
    big, _ = plan_layout({"huge": ((64, 1 << 20), torch.float32)}, 2 << 20, chunk_bytes=16 << 20)
    assert big == [256 << 20]  # larger than a chunk: a chunk of its own


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.tensor([0.5]))

    def forward(self, ids):
        return self.head(self.norm(self.proj(self.embed(ids)))) * self.scale


def test_module_published_then_materialized_from_meta_with_zero_copies(server):
    torch.manual_seed(0)
    src = Tiny()
    ids = torch.tensor([[1, 2, 3, 49]])
    with torch.no_grad():
        expected = src(ids)
    with MemoryClient(server.path, "weights", "rw") as w:
        publish_module(w, src, progress=False)
        assert len(w.layout.sizes) == 1  # everything packed into one allocation
        assert w.layout.tensors["head.weight"] == w.layout.tensors["embed.weight"]  # stored once
        with MemoryClient(server.path, "weights", "ro") as r:
            r.map_all()
            with torch.device("meta"):
                model = Tiny()
            materialize_module(model, r)
            ptrs = {m.va for m in r.mappings.values()}
            for name, t in model.state_dict().items():
                assert any(va <= t.data_ptr() < va + r.mappings[0].size for va in ptrs), name
                assert not t.requires_grad
            model = model.to(_device(r))
            with torch.no_grad():
                out = model(ids.to(_device(r)))
            assert torch.allclose(out.cpu(), expected, atol=1e-4, rtol=1e-4)  # GPU kernels round differently


def test_materialize_refuses_a_mismatched_module(server):
    with MemoryClient(server.path, "weights", "rw") as w:
        publish_module(w, Tiny(), progress=False)
        with torch.device("meta"):
            other = torch.nn.Linear(16, 8)
        with pytest.raises(ValueError, match="does not match"):
            materialize_module(other, w)


def test_remap_at_identical_addresses_keeps_old_tensors_valid(server):
    sd = {"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(64, 64, dtype=torch.bfloat16)}
    with MemoryClient(server.path, "weights", "rw") as w:
        publish_state_dict(w, sd, progress=False)
        r = MemoryClient(server.path, "weights", "ro")
        r.map_all()
        a, b = r.tensor("a"), r.tensor("b")
        addresses = (a.data_ptr(), b.data_ptr())
        r.unmap_all()
        assert not any(m.mapped for m in r.mappings.values())
        r.disconnect()  # a sleeping engine may drop its session entirely
        r.connect()
        r.remap_all()
        assert (r.tensor("a").data_ptr(), r.tensor("b").data_ptr()) == addresses
        assert torch.equal(a.cpu(), sd["a"]) and torch.equal(b.cpu(), sd["b"])  # the old tensor objects
        r.close()


def test_remap_after_the_layout_changed_is_a_clear_error(server):
    w = MemoryClient(server.path, "weights", "rw")
    publish_state_dict(w, {"a": torch.zeros(10)}, progress=False)
    r = MemoryClient(server.path, "weights", "ro")
    r.map_all()
    r.unmap_all()
    r.disconnect()
    w.close()
    with MemoryClient(server.path, "weights", "rw") as w2:  # republish a different layout
        w2.reset()
        publish_state_dict(w2, {"a": torch.zeros(20)}, progress=False)
    r.connect()
    with pytest.raises(LayoutChanged, match="refusing to remap"):
        r.remap_all()
    assert not any(m.mapped for m in r.mappings.values())
    r.close()


def test_kv_layout_is_adopted_by_the_next_owner_at_its_own_addresses(server):
    owner = MemoryClient(server.path, "kv", "rw", name="first")
    blocks = [owner.allocate(2 << 20), owner.allocate(2 << 20)]
    owner.set_metadata(extra={"block_size": 16, "num_blocks": 2})
    for i, m in enumerate(blocks):
        owner.backend.tensor(m.va, m.size).fill_(i + 1)
    hash_before = owner.mapped_hash
    owner.disconnect()  # the owner goes away; its mapping stays valid (memory outlives sessions)

    nxt = MemoryClient(server.path, "kv", "rw", name="second")
    assert nxt.layout.hash == hash_before and nxt.layout.extra["num_blocks"] == 2
    base = nxt.backend.reserve(sum(nxt.layout.sizes))  # the engine's pre-reserved KV range
    nxt.map_all(base=base)
    assert [m.va for m in nxt.mappings.values()] == [base, base + (2 << 20)]
    kv = nxt.backend.tensor(base, 4 << 20)
    assert kv[: 2 << 20].eq(1).all() and kv[2 << 20:].eq(2).all()
    kv[:8].fill_(9)  # the adopter writes the same physical blocks
    assert owner.backend.tensor(blocks[0].va, 8).eq(9).all()
    nxt.reset()
    assert nxt.layout.sizes == []
    nxt.backend.free_reservation(base, 4 << 20)
    nxt.close()
    owner.release_all()
