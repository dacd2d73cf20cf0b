"""Prompts -> 77-token chunks of ids and weights (diffusion_tf.prompts.chunks): A1111's rules."""

import numpy as np
import pytest

from diffusion_tf.clip_tokenizer import CLIPTokenizer
from diffusion_tf.prompts.chunks import batch_chunks, tokenize_chunks

BOS, EOS = 49406, 49407


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def _words(tok, n, word="cat"):
    text = " ".join([word] * n)
    assert len(tok.encode(text)) == n
    return text


@pytest.mark.parametrize("prompt", ["a photo of a cat!", "", "  ", "Hello, world!!! café 🐱", "x) y]: z"])
def test_a_plain_short_prompt_gives_the_tokenizers_ids_and_weight_one(tok, prompt):
    chunks = tokenize_chunks(tok, prompt)
    np.testing.assert_array_equal(chunks.ids, tok([prompt]))
    assert np.all(chunks.weights == 1.0)


def test_sd2_pad_token_follows_the_first_eos():
    tok2 = CLIPTokenizer(pad_token_id=0)
    chunks = tokenize_chunks(tok2, _words(tok2, 80))
    assert chunks.ids.shape == (2, 77)
    assert list(chunks.ids[1, :8]) == [BOS] + [tok2.encode("cat")[0]] * 5 + [EOS, 0]
    assert np.all(chunks.ids[1, 8:] == 0)


def test_long_prompt_is_cut_into_75_token_chunks_each_with_bos_and_eos(tok):
    chunks = tokenize_chunks(tok, _words(tok, 160))
    assert chunks.ids.shape == (3, 77)
    assert np.all(chunks.ids[:, 0] == BOS)
    assert np.all(chunks.ids[:2, 76] == EOS) and np.all(chunks.ids[:2, 1:76] != EOS)
    assert list(chunks.ids[2, :12]) == [BOS] + [tok.encode("cat")[0]] * 10 + [EOS]
    # exactly 75 tokens: one full chunk
    assert tokenize_chunks(tok, _words(tok, 75)).ids.shape == (1, 77)


def test_emphasis_weights_land_on_their_tokens_only(tok):
    chunks = tokenize_chunks(tok, "a (red:1.5) car [fast]")
    ids, w = list(chunks.ids[0]), chunks.weights[0]
    red, car, fast = (tok.encode(x)[0] for x in ("red", "car", "fast"))
    assert w[ids.index(red)] == 1.5 and w[ids.index(car)] == 1.0
    assert w[ids.index(fast)] == pytest.approx(1 / 1.1)
    assert w[0] == 1.0 and w[ids.index(EOS)] == 1.0  # BOS, EOS and padding keep weight 1


def test_break_ends_the_chunk(tok):
    chunks = tokenize_chunks(tok, "a cat BREAK a dog")
    assert chunks.ids.shape == (2, 77)
    np.testing.assert_array_equal(chunks.ids[0], tok(["a cat"])[0])
    np.testing.assert_array_equal(chunks.ids[1], tok(["a dog"])[0])


def test_a_full_chunk_backtracks_to_a_comma_among_its_last_20_tokens(tok):
    head = _words(tok, 70)
    chunks = tokenize_chunks(tok, head + ", " + _words(tok, 10, "dog"))
    # 70 cats + the comma stay; the 10 dogs (of which 4 would have fitted) move to chunk 2
    assert list(chunks.ids[0, 70:74]) == [tok.encode("cat")[0], tok.encode(",")[0], EOS, EOS]
    assert list(chunks.ids[1, :12]) == [BOS] + [tok.encode("dog")[0]] * 10 + [EOS]
    # a comma further back than 20 tokens: no backtrack, the chunk is filled
    far = tokenize_chunks(tok, _words(tok, 50) + ", " + _words(tok, 40, "dog"))
    assert far.ids[0, 75] == tok.encode("dog")[0]


def test_truncate_keeps_the_first_75_tokens_with_the_tokenizers_warning_and_never_backtracks(tok):
    text = _words(tok, 70) + ", " + _words(tok, 10, "dog")
    with pytest.warns(UserWarning, match="truncated"):
        cut = tokenize_chunks(tok, text, syntax=False, truncate=True)
    with pytest.warns(UserWarning, match="truncated"):
        expected = tok([text])
    np.testing.assert_array_equal(cut.ids, expected)


def test_a_multi_vector_token_never_straddles_two_chunks():
    tok = CLIPTokenizer()
    ids = tok.add_tokens(["sty9", "sty9_1", "sty9_2"])
    chunks = tokenize_chunks(tok, _words(tok, 74) + " sty9")
    assert chunks.ids.shape == (2, 77)
    assert chunks.ids[0, 75] == EOS  # the slot left is padding
    assert list(chunks.ids[1, :5]) == [BOS, *ids, EOS]


def test_a_batch_and_its_negatives_share_one_chunk_count(tok):
    ids, w = batch_chunks(tok, ["short", _words(tok, 100)])
    assert ids.shape == w.shape == (2, 2, 77)
    np.testing.assert_array_equal(ids[0, 1], tok([""])[0])  # padded with the empty prompt's chunk
    neg, _ = batch_chunks(tok, [""], min_chunks=2)
    assert neg.shape == (1, 2, 77)
