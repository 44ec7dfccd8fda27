"""The checkpoint reader's windows, aligned reads and staged pipeline, on real files on the CPU."""

from __future__ import annotations

import mmap

import pytest
import torch
from safetensors.torch import save_file

from understudy.engine.model.fast_load import (ALIGN, MODES, Piece, Staging, StoredTensor, copy_direct,
                                               plan_windows, read_header, spans)

PAGE = mmap.PAGESIZE


def pieces(*ranges):
    return [Piece(offset, n, torch.empty(0)) for offset, n in ranges]


def test_spans_widen_to_the_alignment_and_merge_what_touches():
    # exact: contiguous pieces merge, a gap keeps two reads
    assert spans(pieces((10, 5), (15, 5), (30, 1))) == [(10, 20), (30, 31)]
    # aligned: each range is the 4 KiB-aligned superset; supersets that overlap or touch merge
    assert spans(pieces((100, 50), (5000, 10), (2 * ALIGN + 1, 1)), ALIGN) == [(0, 3 * ALIGN)]
    assert spans(pieces((100, 50), (3 * ALIGN, ALIGN)), ALIGN) == [(0, ALIGN), (3 * ALIGN, 4 * ALIGN)]
    assert spans(pieces((ALIGN - 1, 2)), ALIGN) == [(0, 2 * ALIGN)]
    for start, stop in spans(pieces((12345, 6789), (40000, 1)), ALIGN):
        assert start % ALIGN == 0 and stop % ALIGN == 0


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
        assert w.base % PAGE == 0 and w.base <= w.pieces[0].offset and w.end - w.base <= window
        assert len({p.offset // window for p in w.pieces}) == 1  # nothing crosses a window multiple
        for p in w.pieces:
            covered[p.offset] = p.nbytes
    offsets = sorted(covered)
    assert offsets[0] == min(s.offset for s in stored.values())
    assert all(a + covered[a] == b for a, b in zip(offsets, offsets[1:]))  # contiguous, no overlap
    assert sum(covered.values()) == sum(sizes)
    with pytest.raises(ValueError):
        plan_windows(jobs, PAGE + 1)


def write_checkpoint(d, seed=0):
    """Two shards of odd-sized tensors of several dtypes; file sizes are not multiples of 4 KiB, so the last
    aligned read of each runs past the end of its file."""
    g = torch.Generator().manual_seed(seed)
    tensors = [{"a": torch.randn(300, 129, generator=g, dtype=torch.float32),
                "b": torch.randn(7, generator=g).to(torch.bfloat16),
                "c": torch.randint(0, 255, (50001,), generator=g, dtype=torch.uint8)},
               {"d": torch.randn(3, 5, generator=g, dtype=torch.float16),
                "e": torch.randn(1000, 37, generator=g).to(torch.bfloat16)}]
    for k, shard in enumerate(tensors):
        save_file(shard, str(d / f"model-{k}.safetensors"))
        assert (d / f"model-{k}.safetensors").stat().st_size % ALIGN
    return {n: t for shard in tensors for n, t in shard.items()}


@pytest.mark.parametrize("mode", MODES)
def test_staged_pipeline_fills_every_destination(tmp_path, mode):
    """Several threads, windows of 4 pages, two stages in flight each: every byte lands where it belongs
    and the progress callback sees each byte once ('register' on the CPU reads out of the mapping)."""
    want = write_checkpoint(tmp_path)
    stored = {n: s for f in sorted(tmp_path.glob("*.safetensors")) for n, s in read_header(f).items()}
    dst = {n: torch.zeros_like(t) for n, t in want.items()}
    seen = []
    copy_direct([(stored[n], dst[n]) for n in want], staging=Staging("cpu", threads=3, mode=mode, window=4 * PAGE),
                on_bytes=seen.append)
    assert all(torch.equal(dst[n], t) for n, t in want.items())
    assert sum(seen) == sum(t.numel() * t.element_size() for t in want.values())


@pytest.mark.parametrize("staged", [False, True])
def test_only_the_wanted_bytes_are_written(tmp_path, staged):
    """A shard's rows (as under tensor parallelism) and a skipped tensor: the rows arrive, nothing else
    is touched, neither by the direct pread path nor through aligned O_DIRECT reads."""
    want = write_checkpoint(tmp_path)
    stored = read_header(tmp_path / "model-0.safetensors")
    a = stored["a"]
    row = a.nbytes // a.shape[0]
    rows = StoredTensor(a.file, a.offset + 100 * row, 50 * row, a.dtype, (50, a.shape[1]))
    out = torch.full((52, a.shape[1]), -1.0)
    staging = Staging("cpu", threads=2, mode="odirect", window=2 * PAGE) if staged else None
    copy_direct([(rows, out[1:51]), (stored["b"], b := torch.zeros(7, dtype=torch.bfloat16))], staging=staging)
    assert torch.equal(out[1:51], want["a"][100:150]) and torch.equal(b, want["b"])
    assert (out[0] == -1).all() and (out[51] == -1).all()
