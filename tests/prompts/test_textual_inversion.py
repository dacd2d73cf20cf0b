"""Textual-inversion embeddings: diffusers parity on the tiny SD 1.x model (an A1111 .pt with two
vectors and a mixed-case name, a diffusers learned_embeds.safetensors with one), the embeddings
folder, and every bad input leaving the pipeline as it was."""

import importlib.util
import os
import pickle
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from support import tiny_models
from support.torch_format import command_payload, hostile_command_file, pickle_bytes, save_torch_zip

pytestmark = pytest.mark.xdist_group("tiny-sd1")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "prompts")
A1111 = os.path.join(FIXTURES, "mystyle.pt")
DIFFUSERS = os.path.join(FIXTURES, "learned_embeds.safetensors")


@pytest.fixture(scope="module")
def pipe(tiny_folder, tmp_path_factory):
    from diffusion_tf import Text2Image

    empty = tmp_path_factory.mktemp("no-embeddings")
    return Text2Image(model=tiny_folder, img_height=64, img_width=64, embedding_dir=str(empty))


@pytest.fixture
def clean(pipe):
    pipe.unload_textual_inversion()
    yield pipe
    pipe.unload_textual_inversion()


def _state(pipe):
    return (pipe.tokenizer.vocab_size, dict(pipe.tokenizer.added_tokens), pipe.conditioning.extra_embeddings())


def test_ids_embeddings_and_image_equal_diffusers(clean, prompt_reference):
    meta = prompt_reference["meta"]
    assert clean.load_textual_inversion(A1111) == ["MyStyle", "MyStyle_1"]  # the file's `name`
    assert clean.load_textual_inversion(DIFFUSERS) == ["<cat-toy>"]  # the file's key
    from diffusion_tf.prompts.chunks import batch_chunks

    ids, _ = batch_chunks(clean.tokenizer, meta["ti_prompts"])
    np.testing.assert_array_equal(ids[:, 0], prompt_reference["ti_ids"])
    out = np.asarray(clean.encode_text(meta["ti_prompts"]))
    ref = prompt_reference["ti_text_embeds"]
    assert np.abs(out - ref).max() / max(1.0, np.abs(ref).max()) <= 1e-4
    image = clean.generate(meta["ti_gen_prompt"], negative_prompt=meta["negative"], num_steps=meta["steps"],
                           unconditional_guidance_scale=meta["guidance"],
                           latents=tiny_models.reference("tiny-sd1")["gen_latents"])
    diff = np.abs(image.astype(int) - prompt_reference["ti_gen_image"].astype(int)).max()
    assert diff <= 2, f"{diff}/255"


def test_mixed_case_multi_vector_tokens_expand_as_diffusers_or_as_a1111(clean):
    clean.load_textual_inversion(A1111)
    mine = clean.tokenizer.added_tokens["mystyle"]
    assert list(clean.tokenize("MyStyle")[0, :3]) == [49406, mine, 49407]  # diffusers: the first vector only
    clean.unload_textual_inversion()
    clean.load_textual_inversion(A1111, expand=True)
    assert list(clean.tokenize("MyStyle")[0, :4]) == [49406, mine, mine + 1, 49407]
    clean.unload_textual_inversion()
    clean.load_textual_inversion(A1111, token="lowstyle")  # lower case: expanded, as diffusers does
    low = clean.tokenizer.added_tokens["lowstyle"]
    assert list(clean.tokenize("a lowstyle")[0, :5]) == [49406, 320, low, low + 1, 49407]


def test_an_a1111_safetensors_takes_the_file_stem(clean, tmp_path):
    vec = np.random.default_rng(0).standard_normal((3, 32)).astype("float32")
    save_file({"emb_params": vec}, str(tmp_path / "paper_cut.safetensors"))
    assert clean.load_textual_inversion(str(tmp_path / "paper_cut.safetensors")) == [
        "paper_cut", "paper_cut_1", "paper_cut_2"]
    np.testing.assert_array_equal(clean.conditioning.extra_embeddings(), vec)


@pytest.mark.heavy  # 10-20 s: with CI's heavy run, out of the default suite's time
def test_the_embeddings_folder_words_load_when_a_prompt_uses_them(clean, tmp_path):
    shutil.copy(A1111, tmp_path / "EasyStyle.pt")
    own = clean.embedding_dir
    clean.embedding_dir = str(tmp_path)
    try:
        without = clean.generate("a cat, easy style", num_steps=1, seed=0)
        assert not clean.tokenizer.added_tokens  # not named: not loaded
        with_word = clean.generate("a cat, easystyle", num_steps=1, seed=0)
    finally:
        clean.embedding_dir = own
    assert "easystyle" in clean.tokenizer.added_tokens and "easystyle_1" in clean.tokenizer.added_tokens
    assert np.abs(with_word.astype(int) - without.astype(int)).max() > 0
    # A1111: all the vectors of a folder's word
    first = clean.tokenizer.added_tokens["easystyle"]
    assert list(clean.tokenize("easystyle")[0, :4]) == [49406, first, first + 1, 49407]


def _write(path, tensors):
    save_file(tensors, str(path))
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("width", "width 48; this model's text_encoder is 32 wide"),
    ("nan", "NaN or Inf"),
    ("vocab_word", "already in the tokenizer's vocabulary"),
    ("twice", "already in the tokenizer's vocabulary"),
    ("lora", "not a textual-inversion embedding"),
    ("sdxl", "clip_g, clip_l; this model needs 'text_encoder'.*SDXL embedding on an SD 1.x/2.x model"),
    ("extension", "unsupported extension"),
    ("token", "token=''"),
])
def test_bad_embeddings_are_errors_and_change_nothing(clean, tmp_path, case, message):
    rng = np.random.default_rng(0)
    clean.load_textual_inversion(DIFFUSERS)
    before = _state(clean)
    token = None
    if case == "missing":
        path = str(tmp_path / "nothing.pt")
    elif case == "width":
        path = _write(tmp_path / "wide.safetensors", {"emb_params": rng.standard_normal((2, 48)).astype("float32")})
    elif case == "nan":
        path = _write(tmp_path / "nan.safetensors", {"emb_params": np.full((2, 32), np.nan, "float32")})
    elif case == "vocab_word":
        path, token = A1111, "cat"
    elif case == "twice":
        path = DIFFUSERS
    elif case == "lora":
        path = _write(tmp_path / "lora.safetensors", {
            f"lora_unet_down_blocks_0_attentions_0_proj_in.lora_{k}.weight": rng.standard_normal((4, 4)).astype("float32")
            for k in ("up", "down")})
    elif case == "sdxl":
        path = _write(tmp_path / "xl.safetensors", {"clip_l": rng.standard_normal((2, 768)).astype("float32"),
                                                      "clip_g": rng.standard_normal((2, 1280)).astype("float32")})
    elif case == "extension":
        path = str(tmp_path / "emb.txt")
        open(path, "w").close()
    else:
        path, token = A1111, ""
    with pytest.raises(ValueError, match=message):
        clean.load_textual_inversion(path, token=token)
    after = _state(clean)
    assert after[:2] == before[:2]
    np.testing.assert_array_equal(after[2], before[2])


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec"])
def test_a_hostile_pt_embedding_is_refused_and_never_runs(clean, tmp_path, kind):
    marker = tmp_path / "ran"
    path = hostile_command_file(tmp_path / "evil.pt", kind, marker)
    before = _state(clean)
    with pytest.raises(ValueError, match=rf"refusing global '{kind}'"):
        clean.load_textual_inversion(str(path))
    assert not marker.exists() and _state(clean)[:2] == before[:2]
    pickle.loads(pickle_bytes(command_payload(kind, marker)))  # control: the payload does run under pickle
    assert marker.exists()


def test_a_diffusers_bin_embedding_loads_through_the_safe_reader(clean, tmp_path):
    vec = np.random.default_rng(1).standard_normal(32).astype("float32")
    path = save_torch_zip({"<bin-tok>": vec}, str(tmp_path / "learned_embeds.bin"), wrap_in_state_dict=False)
    assert clean.load_textual_inversion(os.fspath(path)) == ["<bin-tok>"]
    np.testing.assert_array_equal(clean.conditioning.extra_embeddings(), vec[None])


LIVE_SCRIPT = r"""
import json, sys
import transformers
from diffusers.loaders import TextualInversionLoaderMixin
folder, tokens, prompts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
ref = transformers.CLIPTokenizer.from_pretrained(folder)
for token, n in tokens:
    ref.add_tokens([token] + [f"{token}_{i}" for i in range(1, n)])
loader = TextualInversionLoaderMixin()
out = [ref(loader.maybe_convert_prompt(p, ref), padding="max_length", max_length=77, truncation=True).input_ids
       for p in prompts]
print(json.dumps(out))
"""


@pytest.mark.live
@pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("torch", "diffusers", "transformers")),
                    reason="the live check needs torch, diffusers and transformers")
def test_live_token_ids_equal_diffusers_for_edge_prompts(clean, tmp_path):
    """diffusers' maybe_convert_prompt + transformers' tokenizer with the same added tokens, run now in a
    fresh process (importing torch after TensorFlow crashes)."""
    import json
    import subprocess
    import sys

    from diffusion_tf.clip_tokenizer import CLIPTokenizer

    CLIPTokenizer().save_vocabulary(str(tmp_path))
    tokens = [("<cat-toy>", 1), ("lowstyle", 3), ("MixStyle", 2)]
    for token, n in tokens:
        path = _write(tmp_path / f"{token.strip('<>')}.safetensors", {"emb_params": np.zeros((n, 32), "float32")})
        clean.load_textual_inversion(path, token=token)
    prompts = ["<cat-toy>!!", "a lowstyle, MixStyle and mixstyle", "LOWSTYLE café 🐱 <cat-toy><cat-toy>",
               "concatenate lowstyles", "lowstyle_1 alone", "lowstyle lowstyle", "MIXSTYLE_1"]
    proc = subprocess.run([sys.executable, "-c", LIVE_SCRIPT, str(tmp_path), json.dumps(tokens), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = json.loads(proc.stdout.strip().splitlines()[-1])
    for prompt, ids in zip(prompts, expected):
        assert list(clean.tokenize(prompt)[0]) == ids, prompt
