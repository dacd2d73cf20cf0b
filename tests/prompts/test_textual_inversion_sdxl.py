"""Textual inversion on SDXL: parity with diffusers on the tiny SDXL models (fixtures:
scripts/make_sdxl_lora_fixtures.py, tests/fixtures/lora-sdxl/ti_*.safetensors).

SDXL embedding files hold one set of vectors per text encoder, {"clip_l": [n, 32], "clip_g": [n, 48]}
at the tiny encoders' widths. diffusers loads them as its SDXL docs do (clip_l with text_encoder /
tokenizer, clip_g with text_encoder_2 / tokenizer_2, `load_textual_inversion(tensor, token=...)`); we
load the file with `Text2Image.load_textual_inversion(path, token)`. With a one-vector (`<xl-one>`) and
a three-vector (`xlthree`, expanded to `xlthree xlthree_1 xlthree_2` as diffusers' maybe_convert_prompt
does) embedding: the token ids of both tokenizers are equal, prompt_embeds and pooled within 1e-4, a
4-step Euler generation within 2/255. The refiner (the second encoder only) reads clip_g, from an SDXL
file and from a clip_g-only file. Files that do not fit (an SD 1.x embedding, swapped widths, clip_g
only on the base, unequal vector counts, clip_l only on the refiner) are errors that change nothing.
"""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from support import tiny_models
from support.parity import assert_close

pytestmark = pytest.mark.xdist_group("sdxl")  # the session's tiny SDXL pipelines (tests/conftest.py)

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "lora-sdxl")
with open(os.path.join(FIXTURES, "reference.json"), encoding="utf-8") as _f:
    META = json.load(_f)
TI = META["ti_files"]


def _file(name):
    return os.path.join(FIXTURES, TI[name]["file"])


@pytest.fixture(scope="module")
def ref():
    with np.load(os.path.join(FIXTURES, "reference.npz")) as f:
        return {k: f[k] for k in f.files if k.startswith("ti_")}


def _pipeline(tiny_sdxl_pipes, name, tmp_path_factory):
    from diffusion_tf import Text2Image

    return Text2Image(model=tiny_sdxl_pipes[(name, "diffusers")].model_path, img_height=64, img_width=64,
                      prompt_syntax="plain", embedding_dir=str(tmp_path_factory.mktemp("no-embeddings")))


@pytest.fixture(scope="module")
def base(tiny_sdxl_pipes, tmp_path_factory):
    """Our own pipeline on the session's converted tiny-sdxl folder (added tokens change its tokenizers)."""
    return _pipeline(tiny_sdxl_pipes, "tiny-sdxl", tmp_path_factory)


@pytest.fixture(scope="module")
def refiner(tiny_sdxl_pipes, tmp_path_factory):
    return _pipeline(tiny_sdxl_pipes, "tiny-sdxl-refiner", tmp_path_factory)


@pytest.fixture
def loaded(base):
    """The base with <xl-one> (1 vector) and xlthree (3 vectors) loaded."""
    base.unload_textual_inversion()
    assert base.load_textual_inversion(_file("one"), TI["one"]["token"]) == ["<xl-one>"]
    assert base.load_textual_inversion(_file("three"), TI["three"]["token"]) == ["xlthree", "xlthree_1", "xlthree_2"]
    yield base
    base.unload_textual_inversion()


def _state(pipe):
    """Everything loading an embedding changes: each tokenizer's ids and added tokens, each tower's vectors."""
    towers = [(tok.vocab_size, dict(tok.added_tokens)) for _, tok, _ in pipe.conditioning.towers]
    return towers, pipe.conditioning.all_extra_embeddings()


def _assert_state_equal(a, b):
    assert a[0] == b[0]
    for x, y in zip(a[1], b[1]):
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(x, y)


def test_token_ids_of_both_tokenizers_equal_diffusers(loaded, ref):
    ids, _ = loaded.conditioning.tokens(META["ti_prompts"])
    assert len(ids) == 2
    np.testing.assert_array_equal(ids[0][:, 0], ref["ti_ids_1"])
    np.testing.assert_array_equal(ids[1][:, 0], ref["ti_ids_2"])
    np.testing.assert_array_equal(loaded.tokenize(META["ti_prompts"]), ref["ti_ids_1"])
    first = loaded.tokenizer.added_tokens["<xl-one>"]
    assert loaded.tokenizer_2.added_tokens["<xl-one>"] == first  # the same ids in both tokenizers
    assert {first, first + 1, first + 2, first + 3} <= set(ref["ti_ids_2"].ravel().tolist())


def test_prompt_embeds_and_pooled_equal_diffusers(loaded, ref):
    context, pooled = loaded.encode_text(META["ti_prompts"])
    assert_close(context, ref["ti_embeds"], "prompt_embeds with SDXL embeddings")
    assert_close(pooled, ref["ti_pooled"], "pooled_prompt_embeds with SDXL embeddings")
    # each encoder gets its own vectors: clip_l's for text_encoder, clip_g's for text_encoder_2
    vectors = loaded.conditioning.all_extra_embeddings()
    assert [v.shape for v in vectors] == [(4, 32), (4, 48)]
    three = load_file(_file("three"))
    np.testing.assert_array_equal(vectors[0][1:], three["clip_l"])
    np.testing.assert_array_equal(vectors[1][1:], three["clip_g"])


@pytest.mark.heavy  # 6-9 s, a variant of a default-run check: with CI's heavy run
def test_generation_equals_diffusers(loaded, ref):
    latents = tiny_models.reference("tiny-sdxl")["gen_neg_latents"]
    image = loaded.generate(META["ti_gen_prompt"], negative_prompt=META["negative"], num_steps=META["steps"],
                            unconditional_guidance_scale=META["guidance"], scheduler="euler", latents=latents,
                            height=META["size"], width=META["size"])
    diff = int(np.abs(image.astype(int) - ref["ti_gen_image"].astype(int)).max())
    assert diff <= 2, f"generation with SDXL embeddings differs from diffusers by {diff}/255"


def test_the_refiner_reads_clip_g(refiner, ref):
    refiner.unload_textual_inversion()
    try:
        # an SDXL file (clip_l is left out: the refiner has no first encoder) and a clip_g-only file
        assert refiner.load_textual_inversion(_file("three"), "xlthree") == ["xlthree", "xlthree_1", "xlthree_2"]
        assert refiner.load_textual_inversion(_file("g"), TI["g"]["token"]) == ["<xl-g>", "<xl-g>_1"]
        ids, _ = refiner.conditioning.tokens(META["refiner_prompts"])
        assert len(ids) == 1
        np.testing.assert_array_equal(ids[0][:, 0], ref["ti_refiner_ids_2"])
        context, pooled = refiner.encode_text(META["refiner_prompts"])
        assert_close(context, ref["ti_refiner_embeds"], "refiner prompt_embeds with SDXL embeddings")
        assert_close(pooled, ref["ti_refiner_pooled"], "refiner pooled_prompt_embeds with SDXL embeddings")
    finally:
        refiner.unload_textual_inversion()


def test_a_clip_g_only_file_takes_its_stem(refiner):
    refiner.unload_textual_inversion()
    try:
        assert refiner.load_textual_inversion(_file("g")) == ["ti_clip_g", "ti_clip_g_1"]
    finally:
        refiner.unload_textual_inversion()


def _write(path, tensors):
    save_file(tensors, str(path))
    return str(path)


def _vectors(n, width, seed=0):
    return np.random.default_rng(seed).standard_normal((n, width)).astype("float32")


BAD = [  # (model, file tensors, message)
    ("base", {"emb_params": _vectors(2, 32)},
     r"holds vectors for text_encoder; this model needs clip_l and clip_g .*SD 1.x/2.x embedding on an SDXL model"),
    ("base", {"clip_l": _vectors(1, 48), "clip_g": _vectors(1, 32)},
     r"has vectors of width 48; this model's text_encoder is 32 wide"),
    ("base", {"clip_l": _vectors(1, 32), "clip_g": _vectors(1, 32)},
     r"has vectors of width 32; this model's text_encoder_2 is 48 wide"),
    ("base", {"clip_g": _vectors(2, 48)}, r"needs clip_l and clip_g .*clip_g-only file is for the SDXL refiner"),
    ("base", {"clip_l": _vectors(1, 32), "clip_g": _vectors(2, 48)}, r"different vector counts \(1, 2\)"),
    ("refiner", {"clip_l": _vectors(1, 32)}, r"holds vectors for clip_l; this model needs clip_g"),
    ("refiner", {"clip_l": _vectors(1, 32), "clip_g": _vectors(1, 32)},
     r"has vectors of width 32; this model's text_encoder_2 is 48 wide"),
    ("refiner", {"emb_params": _vectors(1, 32)}, r"has vectors of width 32; this model's text_encoder_2 is 48 wide"),
]


@pytest.mark.parametrize("model, tensors, message", BAD)
def test_bad_embeddings_are_errors_and_change_nothing(base, refiner, tmp_path, model, tensors, message):
    pipe = base if model == "base" else refiner
    pipe.unload_textual_inversion()
    try:
        pipe.load_textual_inversion(_file("three"), "xlthree")  # already loaded: stays exactly as it is
        before = _state(pipe)
        with pytest.raises(ValueError, match=message):
            pipe.load_textual_inversion(_write(tmp_path / "bad.safetensors", tensors), "<bad>")
        _assert_state_equal(_state(pipe), before)
        with pytest.raises(ValueError, match="already"):  # the same token twice
            pipe.load_textual_inversion(_file("one"), "xlthree")
        _assert_state_equal(_state(pipe), before)
    finally:
        pipe.unload_textual_inversion()


def test_an_sdxl_embedding_on_sd1_is_an_error(tiny_folder, tmp_path):
    from diffusion_tf import Text2Image

    sd1 = Text2Image(model=tiny_folder, img_height=64, img_width=64)
    with pytest.raises(ValueError, match=r"this model needs 'text_encoder'.*SDXL embedding on an SD 1.x/2.x model"):
        sd1.load_textual_inversion(_file("one"), "<xl-one>")
    with pytest.raises(ValueError, match=r"holds vectors for clip_g; .*SDXL embedding on an SD 1.x/2.x model"):
        sd1.load_textual_inversion(_file("g"))
    assert not sd1.tokenizer.added_tokens
