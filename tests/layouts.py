"""Small layouts for the tests: named corner cases plus seeded random ones."""

from __future__ import annotations

import random

from ultragen.core import AttentionRules, GuidanceSegment, ImageSegment, Layout, ReferenceSegment, TextSegment

NAMED = {
    "partial-border-windows": Layout((TextSegment(7), ImageSegment(9, 13, window=(4, 4)))),
    "odd-text-non-square-hilbert": Layout(
        (TextSegment(13), ImageSegment(11, 6, window=(4, 3), token_order="hilbert"), GuidanceSegment(3, 2))
    ),
    "guidance-global": Layout((TextSegment(5), ImageSegment(12, 12, window=(4, 4)), GuidanceSegment(3, 3))),
    "guidance-local": Layout(
        (TextSegment(9), ImageSegment(16, 12, window=(4, 4), token_order="hilbert"), GuidanceSegment(4, 3)),
        AttentionRules(guidance_scope="local", guidance_radius=0, guidance_self_scope="local", guidance_self_radius=1),
    ),
    "radius-0-text-all": Layout(
        (TextSegment(3), ImageSegment(10, 10, window=(5, 5)), GuidanceSegment(5, 5)),
        AttentionRules(neighbour_radius=0, text_sees="all"),
    ),
    "npa-offset": Layout((TextSegment(6), ImageSegment(17, 14)), AttentionRules.npa(patch=4, window=8, offset=(1, 3))),
    "npa-hilbert-guidance": Layout(
        (TextSegment(4), ImageSegment(12, 16, window=(4, 4), token_order="hilbert"), GuidanceSegment(3, 4)),
        AttentionRules.npa(patch=5, window=9, offset=(4, 2), guidance_scope="local"),
    ),
    "reference-tokens": Layout(
        (TextSegment(5), ImageSegment(8, 9, window=(4, 4)), ReferenceSegment(11), GuidanceSegment(2, 3))
    ),
    "reference-sees-all": Layout(
        (TextSegment(4), ImageSegment(7, 6, window=(3, 3)), ReferenceSegment(9)), AttentionRules(text_sees="all")
    ),
    "image-first": Layout((ImageSegment(6, 6, window=(3, 3)), TextSegment(4))),
}


def random_layout(rng: random.Random) -> Layout:
    h, w = rng.randint(3, 20), rng.randint(3, 20)
    window = (rng.randint(2, 8), rng.randint(2, 8))
    segs = [TextSegment(rng.randint(1, 33)), ImageSegment(h, w, window, rng.choice(["window-first", "hilbert"]))]
    if rng.random() < 0.7:
        segs.append(GuidanceSegment(rng.randint(1, h), rng.randint(1, w)))
    if rng.random() < 0.3:
        segs.append(ReferenceSegment(rng.randint(1, 9)))
    common = dict(
        text_sees=rng.choice(["context", "all"]),
        guidance_scope=rng.choice(["global", "local"]),
        guidance_radius=rng.randint(0, 2),
        guidance_self_scope=rng.choice(["global", "local"]),
        guidance_self_radius=rng.randint(0, 2),
    )
    if rng.random() < 0.35:
        patch = rng.randint(2, 6)
        offset = (rng.randrange(patch), rng.randrange(patch))
        rules = AttentionRules.npa(patch, rng.randint(patch, 2 * patch + 3), offset, **common)
    else:
        rules = AttentionRules(neighbour_radius=rng.randint(0, 2), **common)
    return Layout(tuple(segs), rules)


def random_layouts(count: int, seed: int) -> list[Layout]:
    rng = random.Random(seed)
    return [random_layout(rng) for _ in range(count)]
