"""The prompt syntax Stable Diffusion users know from AUTOMATIC1111's web UI: emphasis, BREAK and
extra-network tags. Pure Python (no TensorFlow), so the CLI checks prompts before it starts one.

Emphasis (`parse_emphasis`):

    (word)          weight x 1.1          ((word))    x 1.21 (each level multiplies)
    [word]          weight / 1.1          (word:1.5)  weight x 1.5 (any number, also 0.5 or -1)
    \\( \\) \\[ \\]     literal brackets      \\\\          a literal backslash
    BREAK           (capitals, a word of its own) ends the current 75-token chunk

An unclosed `(` or `[` weighs everything after it; a `)` or `]` with nothing open is literal text;
`(word:x)` without a number is `(word:x)` at x 1.1 (the colon stays text). Runs of equal weight
merge, and the text between brackets is tokenized piece by piece (`a (red) car` tokenizes "a ",
"red" and " car"), as A1111 does.

Extra networks (`extract_networks`): `<lora:NAME:SCALE>` (SCALE optional, 1.0 by default; A1111's
`<lora:NAME:TE:UNET>` with two scales is refused by name, so is any other network kind such as
`<hypernet:...>`) are taken out of the prompt: the text encoder never sees them.
"""

import math
import re

BRACKET_UP = 1.1
BREAK = "BREAK"

# One token of the emphasis syntax, tried in this order.
_TOKEN = re.compile(
    r"""
    \\[()\[\]\\]                         # an escaped bracket or backslash
    | \\                                 # a lone backslash: text
    | \(                                 # open round
    | \[                                 # open square
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)   # ":1.5)" closes a round bracket with its weight
    | \)                                 # close round
    | \]                                 # close square
    | [^\\()\[\]:]+                      # plain text
    | :                                  # a colon that is not a weight
    """,
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_NETWORK = re.compile(r"<(\w+):([^>]+)>")


class PromptSyntaxError(ValueError):
    """A prompt whose syntax cannot be honoured (a bad extra-network tag)."""


def parse_emphasis(text):
    """[(text, weight)] of a prompt; weight None marks a BREAK. A prompt without syntax gives
    [(prompt, 1.0)]; an empty one [("", 1.0)]."""
    pieces = []  # [text, weight] lists, weights multiplied in place as brackets close
    rounds, squares = [], []

    def scale_from(start, factor):
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for m in _TOKEN.finditer(text):
        token, weight = m.group(0), m.group("weight")
        if token.startswith("\\"):
            pieces.append([token[1:] if len(token) == 2 else token, 1.0])
        elif token == "(":
            rounds.append(len(pieces))
        elif token == "[":
            squares.append(len(pieces))
        elif weight is not None and rounds:
            try:
                factor = float(weight)
            except ValueError:  # e.g. "1.2.3": the close applies, the number is not one
                factor = BRACKET_UP
            scale_from(rounds.pop(), factor)
        elif token == ")" and rounds:
            scale_from(rounds.pop(), BRACKET_UP)
        elif token == "]" and squares:
            scale_from(squares.pop(), 1 / BRACKET_UP)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i:
                    pieces.append([BREAK, None])
                pieces.append([part, 1.0])
    for start in rounds:
        scale_from(start, BRACKET_UP)
    for start in squares:
        scale_from(start, 1 / BRACKET_UP)
    merged = []
    for text_, weight in pieces:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1][0] += text_
        else:
            merged.append([text_, weight])
    return [tuple(p) for p in merged] or [("", 1.0)]


def has_syntax(text):
    """Whether `text` uses any emphasis or BREAK (else it is encoded exactly as plain text)."""
    return parse_emphasis(text) != [(text, 1.0)]


def extract_networks(prompt):
    """(prompt without its `<lora:...>` tags, [(name, scale)] in order). Scales must be finite
    numbers; a tag of another kind or with more fields is a PromptSyntaxError naming it."""
    found = []

    def take(m):
        kind, fields = m.group(1), m.group(2).split(":")
        if kind != "lora":
            raise PromptSyntaxError(
                f"prompt tag {m.group(0)!r}: only <lora:NAME> and <lora:NAME:SCALE> are supported "
                f"(not {kind!r} networks)."
            )
        if len(fields) > 2 or not fields[0].strip():
            raise PromptSyntaxError(
                f"prompt tag {m.group(0)!r}: expected <lora:NAME> or <lora:NAME:SCALE> (one scale for the "
                "whole LoRA; separate text-encoder and UNet scales are not supported)."
            )
        scale = 1.0
        if len(fields) == 2:
            try:
                scale = float(fields[1])
            except ValueError:
                scale = math.nan
            if not math.isfinite(scale):
                raise PromptSyntaxError(f"prompt tag {m.group(0)!r}: scale {fields[1]!r} is not a finite number.")
        found.append((fields[0].strip(), scale))
        return ""

    return _NETWORK.sub(take, prompt), found
