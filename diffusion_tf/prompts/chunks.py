"""A prompt -> token ids and per-token weights in chunks of the text encoder's context (77 tokens).

The rules are A1111's (`modules/sd_hijack_clip.py`), so that a prompt means what its users expect:
- each chunk holds up to 75 prompt tokens between BOS and EOS, padded like the tokenizer pads one
  prompt; a prompt longer than 75 tokens takes several chunks, encoded separately and concatenated
  along the sequence axis (77 x k tokens of context);
- BREAK ends the current chunk (the rest of it is padding);
- when a chunk fills up and a comma lies among its last 20 tokens, the chunk ends after that
  comma and the tokens after it move to the next chunk (A1111's "comma padding backtrack");
- a textual-inversion token with several vectors never straddles two chunks;
- a prompt with no syntax and at most 75 tokens gives exactly the tokenizer's ids, weights 1.

`truncate=True` keeps only the first chunk, with the tokenizer's truncation warning, as diffusers
does with a prompt over 77 tokens.
"""

import warnings

import numpy as np

from diffusion_tf.prompts.syntax import parse_emphasis

COMMA_BACKTRACK = 20


class PromptChunks:
    """ids, weights: [k, context_length] int32 / float32 for one prompt."""

    def __init__(self, ids, weights):
        self.ids, self.weights = ids, weights

    def __len__(self):
        return len(self.ids)


def _comma_id(tokenizer):
    return tokenizer.encoder.get(",</w>")


def tokenize_chunks(tokenizer, prompt, syntax=True, truncate=False, comma_backtrack=COMMA_BACKTRACK):
    """The chunks of one prompt (see the module docstring)."""
    length = tokenizer.context_length - 2
    if truncate:  # diffusers cuts at exactly 75 tokens
        comma_backtrack = 0
    pieces = parse_emphasis(prompt) if syntax else [(prompt, 1.0)]
    comma = _comma_id(tokenizer)
    groups = tokenizer._expansions
    chunks = []  # [(tokens, weights)] without BOS/EOS
    tokens, weights, last_comma = [], [], -1

    def close():
        nonlocal tokens, weights, last_comma
        chunks.append((tokens, weights))
        tokens, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if weight is None:  # BREAK
            close()
            continue
        ids = tokenizer.encode(text)
        pos = 0
        while pos < len(ids):
            token = ids[pos]
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                tokens, weights = list(moved[0]), list(moved[1])
            if len(tokens) == length:
                close()
            group = groups.get(token)
            n = len(group) if group is not None and ids[pos:pos + len(group)] == group else 1
            if n > 1 and len(tokens) + n > length:
                close()
            tokens.extend(ids[pos:pos + n])
            weights.extend([weight] * n)
            pos += n
    if tokens or not chunks:
        close()
    if truncate and len(chunks) > 1:
        dropped = [t for chunk, _ in chunks[1:] for t in chunk]
        warnings.warn(
            "The following part of your prompt was truncated because CLIP can only handle sequences "
            f"up to {tokenizer.context_length} tokens: {tokenizer.decode(dropped)!r}",
            UserWarning,
            stacklevel=3,
        )
        chunks = chunks[:1]
    k = len(chunks)
    out_ids = np.full((k, tokenizer.context_length), tokenizer.pad_token_id, dtype=np.int32)
    out_w = np.ones((k, tokenizer.context_length), dtype=np.float32)
    for row, (chunk, w) in enumerate(chunks):
        # BOS, the tokens, EOS, then the pad id (which is EOS itself for SD 1.x).
        out_ids[row, : len(chunk) + 2] = [tokenizer.bos_token_id, *chunk, tokenizer.eos_token_id]
        out_w[row, 1 : len(chunk) + 1] = w
    return PromptChunks(out_ids, out_w)


def empty_chunk(tokenizer):
    """The chunk of the empty prompt (what shorter prompts of a batch are padded with)."""
    return tokenize_chunks(tokenizer, "", syntax=False)


def batch_chunks(tokenizer, prompts, syntax=True, truncate=False, min_chunks=1):
    """(ids [B, k, 77], weights [B, k, 77]) for a list of prompts, each padded with empty-prompt
    chunks to the longest one's k (at least `min_chunks`: a negative prompt gets the chunk count
    of its prompt, as A1111 pads the shorter of the two)."""
    rows = [tokenize_chunks(tokenizer, p, syntax, truncate) for p in prompts]
    k = max([min_chunks] + [len(r) for r in rows])
    empty = empty_chunk(tokenizer)
    ids = np.stack([np.concatenate([r.ids] + [empty.ids] * (k - len(r))) for r in rows])
    weights = np.stack([np.concatenate([r.weights] + [empty.weights] * (k - len(r))) for r in rows])
    return ids, weights
