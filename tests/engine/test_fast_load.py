"""The checkpoint reader's windows, read spans and staged pipeline, on real files on the CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from understudy.engine.model.fast_load import Piece, Staging, StoredTensor, copy_direct, plan_windows, read_header, spans

PAGE = 4096


def pieces(*ranges):
    return [Piece(offset, n, torch.empty(0)) for offset, n in ranges]


def test_spans_merge_what_touches_and_skip_gaps():
    assert spans(pieces((10, 5), (15, 5), (30, 1))) == [(10, 20), (30, 31)]
    assert spans(pieces((0, 10), (5, 10))) == [(0, 15)]  # overlapping: one read
    assert spans(pieces((0, 10), (11, 1))) == [(0, 10), (11, 12)]  # one byte apart: two reads


def test_windows_cut_each_tensor_at_window_multiples_and_cover_it_once(tmp_path):
    window = 4 * PAGE
    sizes = [3 * window + 5, 7, window, 1, 2 * window - 3]
    save_file({f"t{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate(sizes)}, str(tmp_path / "a.safetensors"))
    stored = read_header(tmp_path / "a.safetensors")
    jobs = [(s, torch.empty(s.nbytes, dtype=torch.uint8)) for s in stored.values()]
    wins = plan_windows(jobs, window)
    assert [w.base for w in wins] == sorted(w.base for w in wins)
    covered = {}
    for w in wins:
        assert w.base == w.pieces[0].offset and w.end - w.base <= window  # fits one buffer
        assert len({p.offset // window for p in w.pieces}) == 1  # nothing crosses a window multiple
        for p in w.pieces:
            covered[p.offset] = p.nbytes
    offsets = sorted(covered)
    assert offsets[0] == min(s.offset for s in stored.values())
    assert all(a + covered[a] == b for a, b in zip(offsets, offsets[1:]))  # contiguous, no overlap
    assert sum(covered.values()) == sum(sizes)
    with pytest.raises(ValueError):
        plan_windows(jobs, 0)


def write_checkpoint(d, seed=0):
    """Two shards of odd-sized tensors of several dtypes (offsets and sizes not multiples of a page)."""
    g = torch.Generator().manual_seed(seed)
    tensors = [{"a": torch.randn(300, 129, generator=g, dtype=torch.float32),
                "b": torch.randn(7, generator=g).to(torch.bfloat16),
                "c": torch.randint(0, 255, (50001,), generator=g, dtype=torch.uint8)},
               {"d": torch.randn(3, 5, generator=g, dtype=torch.float16),
                "e": torch.randn(1000, 37, generator=g).to(torch.bfloat16)}]
    for k, shard in enumerate(tensors):
        save_file(shard, str(d / f"model-{k}.safetensors"))
    return {n: t for shard in tensors for n, t in shard.items()}


@pytest.mark.parametrize("staged", [False, True])
def test_every_destination_is_filled_and_reported_once(tmp_path, staged):
    """Straight pread, and the staged pipeline with 3 threads, windows of 4 pages and two buffers each
    (many windows, each buffer reused): every byte lands where it belongs and the progress callback
    sees each byte once."""
    want = write_checkpoint(tmp_path)
    stored = {n: s for f in sorted(tmp_path.glob("*.safetensors")) for n, s in read_header(f).items()}
    dst = {n: torch.zeros_like(t) for n, t in want.items()}
    seen = []
    staging = Staging("cpu", threads=3, window=4 * PAGE) if staged else None
    copy_direct([(stored[n], dst[n]) for n in want], staging=staging, on_bytes=seen.append)
    assert all(torch.equal(dst[n], t) for n, t in want.items())
    assert sum(seen) == sum(t.numel() * t.element_size() for t in want.values())
    if staged:
        assert len(seen) > 3 * 2  # more windows than the threads' buffers: some thread reused its buffers


@pytest.mark.parametrize("staged", [False, True])
def test_only_the_wanted_bytes_are_written(tmp_path, staged):
    """A shard's rows (as under tensor parallelism) and a skipped tensor: the rows arrive, nothing else
    is touched, neither by the direct pread path nor through the staged windows."""
    want = write_checkpoint(tmp_path)
    stored = read_header(tmp_path / "model-0.safetensors")
    a = stored["a"]
    row = a.nbytes // a.shape[0]
    rows = StoredTensor(a.file, a.offset + 100 * row, 50 * row, a.dtype, (50, a.shape[1]))
    out = torch.full((52, a.shape[1]), -1.0)
    staging = Staging("cpu", threads=2, window=2 * PAGE) if staged else None
    copy_direct([(rows, out[1:51]), (stored["b"], b := torch.zeros(7, dtype=torch.bfloat16))], staging=staging)
    assert torch.equal(out[1:51], want["a"][100:150]) and torch.equal(b, want["b"])
    assert (out[0] == -1).all() and (out[51] == -1).all()
