"""Layouts and block schedules against masks built token by token from the rules."""

import pytest
import torch

from ultragen.core import AttentionRules, GuidanceSegment, ImageSegment, Layout, LayoutError, TextSegment
from ultragen.kernels.schedule import unpack_bits

from layouts import NAMED, random_layouts
from reference import dense_mask

CASES = list(NAMED.items()) + [(f"random-{i}", lay) for i, lay in enumerate(random_layouts(30, seed=2))]


def schedule_as_dense(s) -> torch.Tensor:
    """Expand a schedule back into an (L, L) mask, checking its invariants on the way."""
    n_q, n_kv, bm, bn = s.num_q_blocks, s.num_kv_blocks, s.block_m, s.block_n
    out = torch.zeros(n_q * bm, n_kv * bn, dtype=torch.bool)
    for kind, ptr, idx in (("full", s.full_ptr, s.full_idx), ("partial", s.part_ptr, s.part_idx)):
        assert ptr[0] == 0 and ptr[-1] == idx.numel() and bool((ptr.diff() >= 0).all())
        for r in range(n_q):
            cols = idx[ptr[r] : ptr[r + 1]].tolist()
            assert cols == sorted(set(cols)), "key blocks of a row must be sorted and unique"
            for j, c in zip(range(int(ptr[r]), int(ptr[r + 1])), cols, strict=True):
                tile = out[r * bm : (r + 1) * bm, c * bn : (c + 1) * bn]
                assert not tile.any(), "a tile is scheduled twice"
                if kind == "full":
                    assert (c + 1) * bn <= s.kv_len, "a full tile may not reach past the sequence"
                    tile[:] = True
                else:
                    tile[:] = unpack_bits(s.patterns[s.part_pattern[j]], bn)
    return out[: s.q_len, : s.kv_len], out


@pytest.mark.parametrize("block", [(32, 32), (16, 64), (64, 32), (128, 128)])
@pytest.mark.parametrize("name,layout", CASES, ids=[c[0] for c in CASES])
def test_schedule_is_the_rule(name, layout, block):
    ref = dense_mask(layout)
    s = layout.block_schedule(*block)
    got, padded = schedule_as_dense(s)
    assert torch.equal(got, ref)
    assert not padded[:, s.kv_len :].any(), "keys past the sequence must never be allowed"
    assert s.allowed_pairs == int(ref.sum())
    # Partial tiles are really partial: a fully allowed one would have been scheduled as full.
    for j in range(s.num_partial):
        bits = unpack_bits(s.patterns[s.part_pattern[j]], s.block_n)
        assert bits.any()
    # The predicate (flex's mask_mod) is the same rule.
    idx = torch.arange(layout.seq_len)
    assert torch.equal(layout.predicate()(idx[:, None], idx[None, :]), ref)


def test_schedules_are_cached_and_on_device():
    layout = NAMED["guidance-local"]
    s = layout.block_schedule(32, 32, "cpu")
    assert layout.block_schedule(32, 32, torch.device("cpu")) is s
    assert s.full_idx.device.type == "cpu" and s.full_idx.dtype == torch.int32


def test_one_window_without_guidance_is_dense():
    layout = Layout((TextSegment(5), ImageSegment(7, 9, window=(7, 9))), AttentionRules(text_sees="all"))
    assert bool(dense_mask(layout).all())
    s = layout.block_schedule(32, 32)
    # Only the tail key block (past L = 68) needs a mask, one shared pattern for every row.
    assert s.num_partial == s.num_q_blocks and s.patterns.shape[0] == 1
    assert s.allowed_pairs == layout.seq_len**2


def test_window_aligned_layout_needs_no_element_masks():
    # The benchmark's shape in miniature: 16x16 windows, 128-multiple text and guidance, global guidance.
    layout = Layout(
        (TextSegment(128), ImageSegment(64, 64), GuidanceSegment(16, 16)), AttentionRules(guidance_scope="global")
    )
    s = layout.block_schedule(128, 64)
    assert s.num_partial == 0
    per_window_keys = 9 * 256 + 128 + 256  # 3x3 windows + text + guidance
    first_window_row = s.full_ptr[2] - s.full_ptr[1]  # image block (query rows 128..255)
    assert first_window_row * 64 == 4 * 256 + 128 + 256  # a corner window has 2x2 neighbours
    assert s.allowed_pairs < layout.seq_len * per_window_keys


def test_8k_schedule_memory_is_proportional_to_tiles():
    # 8192 px: 262,144 image tokens. An L x L bool mask would need 78 GB; the schedule a few MB.
    layout = Layout((TextSegment(512), ImageSegment(512, 512), GuidanceSegment(128, 128)))
    s = layout.block_schedule(128, 128)
    stored = sum(t.numel() * t.element_size() for t in (s.full_ptr, s.full_idx, s.part_ptr, s.part_idx))
    assert stored < 16 * (s.num_full + s.num_partial) + 16 * (s.num_q_blocks + 1)
    assert s.num_full + s.num_partial < 0.1 * s.num_q_blocks * s.num_kv_blocks


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Layout((TextSegment(4), ImageSegment(4, 4), GuidanceSegment(5, 2))), "larger than the image"),
        (lambda: Layout((TextSegment(4),)), "exactly one image"),
        (lambda: Layout((ImageSegment(4, 4), ImageSegment(4, 4))), "at most one image"),
        (lambda: Layout((TextSegment(0), ImageSegment(4, 4))), "at least one token"),
        (lambda: Layout((ImageSegment(4, 4, token_order="zigzag"),)), "token_order must be one of"),
        (lambda: Layout((ImageSegment(4, 4),), AttentionRules(text_sees="image")), "text_sees"),
        (lambda: Layout((ImageSegment(4, 4),), AttentionRules(neighbour_radius=-1)), "neighbour_radius"),
        (lambda: Layout((ImageSegment(4, 4),), AttentionRules.npa(patch=4, window=2)), "key window >= patch"),
        (lambda: Layout((ImageSegment(4, 4),), AttentionRules.npa(patch=4, window=8, offset=(4, 0))), "offset"),
    ],
)
def test_bad_layouts_are_explained(make, match):
    with pytest.raises(LayoutError, match=match):
        make()
