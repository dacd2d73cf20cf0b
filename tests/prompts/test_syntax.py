"""A1111's prompt syntax: emphasis, BREAK and <lora:...> tags (diffusion_tf.prompts.syntax).

The expected weights of the first test are the examples of A1111's own `parse_prompt_attention`
documentation (modules/prompt_parser.py), the rules' reference."""

import pytest

from diffusion_tf.prompts.syntax import PromptSyntaxError, extract_networks, has_syntax, parse_emphasis


def _approx(pieces):
    return [(t, pytest.approx(w) if w is not None else None) for t, w in pieces]


@pytest.mark.parametrize("prompt, expected", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("((word))", [("word", 1.21)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", 1 / 1.21)]),
    ("(word:1.5)", [("word", 1.5)]),
    ("(word:0.25) (neg:-1)", [("word", 0.25), (" ", 1.0), ("neg", -1.0)]),
    ("((a:2) b)", [("a", 2.2), (" b", 1.1)]),
    ("(w:x)", [("w:x", 1.1)]),  # no number: the colon is text
    ("x) y]", [("x) y]", 1.0)]),  # closing brackets with nothing open are text
    ("back\\\\slash", [("back\\slash", 1.0)]),
    ("", [("", 1.0)]),
])
def test_emphasis_weights_follow_a1111(prompt, expected):
    assert parse_emphasis(prompt) == _approx(expected)


def test_break_splits_where_it_is_a_word_in_capitals():
    assert parse_emphasis("a cat BREAK a dog") == [("a cat", 1.0), ("BREAK", None), ("a dog", 1.0)]
    assert parse_emphasis("(red BREAK blue)") == _approx([("red", 1.1), ("BREAK", None), ("blue", 1.1)])
    for text in ("a break b", "BREAKFAST", "unBREAK"):
        assert parse_emphasis(text) == [(text, 1.0)]


def test_has_syntax_only_for_prompts_that_use_it():
    for plain in ("a photo of a cat!", "x) y]", "a, b: c", "café 🐱"):
        assert not has_syntax(plain), plain
    for marked in ("(cat)", "[cat]", "a BREAK b", "\\(x\\)"):
        assert has_syntax(marked), marked


def test_lora_tags_are_taken_out_with_their_scales():
    text, tags = extract_networks("a cat <lora:paper-cut:0.7>, <lora:Other_Style> in snow <lora:x:-1.5>")
    assert text == "a cat ,  in snow "  # the tokenizer collapses the spaces
    assert tags == [("paper-cut", 0.7), ("Other_Style", 1.0), ("x", -1.5)]
    assert extract_networks("no tags (here:1.2)") == ("no tags (here:1.2)", [])


@pytest.mark.parametrize("tag, message", [
    ("<lora:a:nan>", "not a finite number"),
    ("<lora:a:inf>", "not a finite number"),
    ("<lora:a:big>", "not a finite number"),
    ("<lora:a:0.5:0.8>", "one scale"),
    ("<hypernet:h:1>", "not 'hypernet'"),
])
def test_bad_lora_tags_are_errors_naming_the_tag(tag, message):
    with pytest.raises(PromptSyntaxError, match=message) as e:
        extract_networks(f"a cat {tag}")
    assert tag in str(e.value)
    assert isinstance(e.value, ValueError)
