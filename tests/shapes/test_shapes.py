"""The captioned-shapes dataset: grammar, geometry, determinism, caption parsing."""

import hashlib
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusion_tf import shapes
from diffusion_tf.shapes import (
    PALETTE,
    POSITIONS,
    SHAPES,
    Spec,
    caption,
    make_dataset,
    parse_caption,
    random_spec,
    random_specs,
    render,
    sample_prompts,
    shape_mask,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_DRAWS = 3000


@pytest.fixture(scope="module")
def drawn():
    images, captions, specs = make_dataset(N_DRAWS, 11, return_specs=True)
    return images, captions, specs


def test_palette_shapes_positions_are_the_issues():
    assert list(PALETTE.items()) == [
        ("red", (220, 40, 40)), ("green", (40, 180, 60)), ("blue", (40, 80, 220)),
        ("yellow", (240, 220, 40)), ("orange", (245, 140, 30)), ("purple", (140, 60, 200)),
        ("white", (245, 245, 245)), ("black", (20, 20, 20)),
    ]
    assert SHAPES == ("circle", "square", "triangle")
    assert POSITIONS == ("left", "right", "top", "bottom")
    assert set(shapes.__all__) >= {"PALETTE", "SHAPES", "POSITIONS", "Spec", "random_spec", "caption",
                                   "parse_caption", "render", "make_dataset", "sample_prompts"}


def test_captions_follow_the_grammar_with_the_right_articles():
    base = dict(size=20, cx=32, cy=32)
    assert caption(Spec("red", "circle", None, "blue", False, **base)) == "a red circle"
    assert caption(Spec("orange", "square", "left", "blue", False, **base)) == "an orange square on the left"
    assert caption(Spec("red", "triangle", None, "orange", True, **base)) == "a red triangle on an orange background"
    assert (caption(Spec("orange", "circle", "bottom", "white", True, **base))
            == "an orange circle on the bottom on a white background")


def test_every_value_appears_and_background_differs(drawn):
    _, captions, specs = drawn
    assert {s.color for s in specs} == set(PALETTE)
    assert {s.shape for s in specs} == set(SHAPES)
    assert {s.position for s in specs} == set(POSITIONS) | {None}
    assert {s.background for s in specs} == set(PALETTE)
    assert {s.background for s in specs if s.background_named} == set(PALETTE)
    assert {s.size for s in specs} == set(range(18, 31))
    assert all(s.background != s.color for s in specs)
    # about half name a position / a background (p = 0.5 each)
    for frac in (np.mean([s.position is not None for s in specs]), np.mean([s.background_named for s in specs])):
        assert 0.45 < frac < 0.55
    for text, spec in zip(captions, specs):
        assert text == caption(spec)
        assert ("an orange" in text) == ("orange" in text)
        assert " a orange" not in f" {text}" and not any(f"an {c}" in text for c in PALETTE if c != "orange")


def test_probabilities_of_naming():
    rng = np.random.default_rng(0)
    none = [random_spec(rng, p_position=0, p_background=0) for _ in range(200)]
    assert all(s.position is None and not s.background_named for s in none)
    every = [random_spec(rng, p_position=1, p_background=1) for _ in range(200)]
    assert all(s.position is not None and s.background_named for s in every)
    with pytest.raises(ValueError, match="p_position"):
        random_spec(rng, p_position=1.5)


def test_named_positions_obey_the_thirds_and_shapes_stay_inside(drawn):
    images, _, specs = drawn
    reference = {}  # the pixel count of each (shape, size) drawn well inside a large margin
    for spec, image in zip(specs, images):
        x0, y0, x1, y1 = spec.extent
        assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 64, spec
        assert x1 - x0 == spec.size
        if spec.position == "left":
            assert spec.cx < 22
        elif spec.position == "right":
            assert spec.cx > 42
        elif spec.position == "top":
            assert spec.cy < 22
        elif spec.position == "bottom":
            assert spec.cy > 42
        # nothing clipped: as many shape pixels as the same shape in the middle of the image
        key = (spec.shape, spec.size)
        if key not in reference:
            reference[key] = int(shape_mask(spec.shape, spec.size, 32, 34).sum())
        mask = np.all(image == PALETTE[spec.color], axis=-1)
        assert int(mask.sum()) == reference[key], spec
        ys, xs = np.nonzero(mask)
        # the pixel centroid is the spec's centre (the triangle's centroid) within a pixel
        assert abs(xs.mean() + 0.5 - spec.cx) <= 1.0 and abs(ys.mean() + 0.5 - spec.cy) <= 1.0, spec
        assert np.ptp(xs) + 1 in (spec.size - 1, spec.size, spec.size + 1)


def test_render_is_two_exact_palette_colours(drawn):
    images, _, specs = drawn
    assert images.dtype == np.uint8 and images.shape == (N_DRAWS, 64, 64, 3)
    for image, spec in zip(images[:300], specs[:300]):
        packed = np.unique(image.reshape(-1, 3).astype(np.int64) @ np.array([65536, 256, 1]))
        colours = {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255) for v in packed}
        assert colours == {PALETTE[spec.color], PALETTE[spec.background]}
        assert tuple(image[0, 0]) == PALETTE[spec.background] or tuple(image[63, 63]) == PALETTE[spec.background]


def test_shape_geometry():
    square = shape_mask("square", 20, 32, 32)
    assert square.sum() == 400 and square[22:42, 22:42].all()
    circle = shape_mask("circle", 30, 32, 32)
    assert abs(circle.sum() / (np.pi * 15 ** 2) - 1) < 0.03
    tri = shape_mask("triangle", 24, 32, 32)  # apex at y = 16, base at y = 40
    rows = np.nonzero(tri.any(axis=1))[0]
    assert rows[0] in (16, 17) and rows[-1] == 39  # the apex pixel row may be empty (too thin)
    widths = tri.sum(axis=1)[rows]
    assert np.all(np.diff(widths) >= 0) and widths[-1] >= 22  # widening downwards: pointing up
    assert abs(tri.sum() / (24 * 24 / 2) - 1) < 0.05
    with pytest.raises(ValueError, match="hexagon"):
        shape_mask("hexagon", 20, 32, 32)


def test_spec_validation():
    ok = dict(color="red", shape="circle", position=None, background="blue", background_named=False,
              size=20, cx=32, cy=32)
    Spec(**ok)
    for bad, match in [({"color": "pink"}, "pink"), ({"background": "red"}, "equals"),
                       ({"shape": "oval"}, "oval"), ({"position": "middle"}, "middle"),
                       ({"size": 31}, "size"), ({"size": 17}, "size")]:
        with pytest.raises(ValueError, match=match):
            Spec(**{**ok, **bad})


def _digest(images, captions):
    h = hashlib.sha256(images.tobytes())
    h.update("\n".join(captions).encode())
    return h.hexdigest()


def test_deterministic_by_seed_across_processes():
    images, captions = make_dataset(300, 5)
    again = make_dataset(300, 5)
    assert np.array_equal(images, again[0]) and captions == again[1]
    other = make_dataset(300, 6)
    assert not np.array_equal(images, other[0]) and captions != other[1]
    code = ("import hashlib, sys; from diffusion_tf.shapes import make_dataset; "
            "im, c = make_dataset(300, 5); h = hashlib.sha256(im.tobytes()); "
            "h.update('\\n'.join(c).encode()); print(h.hexdigest()); "
            "print('tensorflow' in sys.modules, 'PIL' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    digest, imported = out.stdout.split("\n")[:2]
    assert digest == _digest(images, captions)
    assert imported == "False False"  # numpy only: no TensorFlow, no PIL


def test_sample_prompts():
    prompts = sample_prompts(200, 0)
    assert prompts == sample_prompts(200, 0)
    assert prompts != sample_prompts(200, 1)
    assert prompts[:50] != make_dataset(50, 0)[1]  # a stream of its own
    assert len(set(prompts)) > 100
    for p in prompts:
        parse_caption(p)
    assert sample_prompts(0, 0) == []
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            sample_prompts(bad, 0)
    with pytest.raises(ValueError, match="seed"):
        make_dataset(3, -1)


def test_random_specs_matches_make_dataset():
    images, captions, specs = make_dataset(20, 3, return_specs=True)
    assert random_specs(20, 3) == specs
    assert all(np.array_equal(render(s), im) for s, im in zip(specs, images))


def test_caption_parse_round_trip_over_the_whole_grammar():
    count = 0
    for color, shape, position, named in itertools.product(PALETTE, SHAPES, POSITIONS + (None,), (False, True)):
        for background in (b for b in PALETTE if b != color):
            spec = Spec(color, shape, position, background, named, 20, 32, 32)
            parsed = parse_caption(caption(spec))
            assert parsed == {"color": color, "shape": shape, "position": position,
                              "background": background if named else None}
            count += 1
    assert count == 8 * 3 * 5 * 2 * 7
    assert parse_caption("  An Orange Circle on the Left  ")["color"] == "orange"


@pytest.mark.parametrize("text", [
    "", "red circle", "a orange circle", "an red circle", "a red hexagon", "a red circle on the middle",
    "a red circle on a red background", "a red circle on an blue background", "a red circle on a orange background",
    "a red circle on a blue background on the left", "a red  circle", "a red circle on blue background",
    "a red circle on the left on the right", "a pink square", "a red circle.",
])
def test_parse_errors_name_the_text(text):
    with pytest.raises(ValueError) as e:
        parse_caption(text)
    assert repr(text) in str(e.value)


def test_parse_rejects_non_strings():
    with pytest.raises(ValueError):
        parse_caption(None)
