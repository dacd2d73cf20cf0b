"""Prompts -> the UNet's cross-attention context: chunks, emphasis, clip skip, added tokens.

`TextConditioning` holds a model's tokenizer and text encoder with the vectors of its added
(textual-inversion) tokens. `tokens(prompts)` runs on the host (Python BPE); `encode(ids,
weights)` is TensorFlow and runs inside the compiled generation:

1. each 77-token chunk goes through the text encoder on its own (`clip_skip` layers from the end
   left out, then the final layer norm, as diffusers);
2. emphasis, as A1111's "Original" mode: each token's output vector times its weight, then the
   chunk rescaled so that its mean is the unweighted one's. The mean is taken per prompt and chunk
   (A1111 takes it over the whole batch of a chunk; per prompt keeps a batch equal to single
   runs). A chunk whose weights are all 1 is passed through untouched, so a prompt without
   syntax gives bit for bit the embeddings of plain tokenization;
3. the chunks concatenated along the sequence axis: [B, 77 k, D].
"""

import numpy as np
from keras import ops

from diffusion_tf.prompts import chunks, textual_inversion

LONG_PROMPTS = ("chunks", "truncate")
SYNTAXES = ("a1111", "plain")


def check_options(prompt_syntax, long_prompts):
    if prompt_syntax not in SYNTAXES:
        raise ValueError(f"prompt_syntax={prompt_syntax!r}; allowed: {', '.join(SYNTAXES)}.")
    if long_prompts not in LONG_PROMPTS:
        raise ValueError(f"long_prompts={long_prompts!r}; allowed: {', '.join(LONG_PROMPTS)}.")


def check_clip_skip(clip_skip, text_encoder, name="clip_skip"):
    """None (0) or an integer 0 <= clip_skip < the encoder's layer count."""
    layers = text_encoder.num_hidden_layers
    if clip_skip is None:
        return 0
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or not 0 <= clip_skip < layers:
        raise ValueError(
            f"{name}={clip_skip!r}; must be an integer from 0 to {layers - 1} (the layers to skip at the end of "
            f"this {layers}-layer text encoder, as diffusers' clip_skip: 1 is A1111's 'Clip skip: 2') or None."
        )
    return int(clip_skip)


def emphasize(z, weights):
    """z [B, k, T, D] times weights [B, k, T] per token, each chunk's mean restored; chunks with
    all weights 1 untouched (exactly)."""
    w = ops.cast(weights, z.dtype)
    before = ops.mean(z, axis=(2, 3), keepdims=True)
    scaled = z * w[..., None]
    after = ops.mean(scaled, axis=(2, 3), keepdims=True)
    scaled = scaled * (before / after)
    plain = ops.all(ops.equal(weights, 1.0), axis=-1)[..., None, None]
    return ops.where(plain, z, scaled)


class TextConditioning:
    """A tokenizer and its text encoder, with added tokens (see the module docstring)."""

    def __init__(self, tokenizer, text_encoder, prompt_syntax="a1111", long_prompts="chunks"):
        check_options(prompt_syntax, long_prompts)
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.prompt_syntax, self.long_prompts = prompt_syntax, long_prompts
        self._vectors = []  # one [D] row per added token id, in id order
        self.embeddings = {}  # token -> (path, its expanded tokens)
        self._text_expansions = {}  # multi-vector tokens expanded as diffusers does: token -> "tok tok_1 ..."

    # ------------------------------------------------------------ host side
    def convert_prompt(self, prompt):
        """diffusers' `maybe_convert_prompt`: each multi-vector token (loaded the diffusers way) that
        the tokenizer finds in the prompt is replaced, by its spelling as loaded, with `tok tok_1 ...`.
        The tokenizer matches lower-cased text, so a token spelled in capitals is found but never
        replaced, nor is a lower-case token typed in capitals: it reads its first vector only."""
        if self._text_expansions:
            found = self.tokenizer.added_tokens_in(prompt)
            for token, replacement in self._text_expansions.items():
                if token in found:
                    prompt = prompt.replace(token, replacement)
        return prompt

    def tokens(self, prompts, min_chunks=1):
        """(ids [B, k, 77] int32, weights [B, k, 77] float32) of a list of prompts."""
        prompts = [self.convert_prompt(p) for p in prompts]
        return chunks.batch_chunks(self.tokenizer, prompts, syntax=self.prompt_syntax == "a1111",
                                   truncate=self.long_prompts == "truncate", min_chunks=min_chunks)

    def pair(self, prompts, negatives):
        """The tokens of the prompts and of their negatives with one chunk count for both."""
        ids, weights = self.tokens(prompts)
        n_ids, n_weights = self.tokens(negatives, ids.shape[1])
        if n_ids.shape[1] > ids.shape[1]:
            ids, weights = self.tokens(prompts, n_ids.shape[1])
        return (ids, weights), (n_ids, n_weights)

    def extra_embeddings(self):
        """[E, D] float32 vectors of the added tokens, or None when there are none."""
        return np.stack(self._vectors) if self._vectors else None

    # ------------------------------------------------------------ graph side
    def encode(self, ids, weights, extra=None, clip_skip=0):
        """Token ids and weights [B, k, T] -> context [B, k T, D]."""
        t = self.tokenizer.context_length
        shape = ops.shape(ids)  # dynamic in a graph traced for several batch sizes or chunk counts
        b, k = shape[0], shape[1]
        z = self.text_encoder(ops.reshape(ids, (-1, t)), extra_embeddings=extra, clip_skip=clip_skip)
        d = z.shape[-1]
        z = emphasize(ops.reshape(z, (b, k, t, d)), weights)
        return ops.reshape(z, (b, k * t, d))

    # ------------------------------------------------------------ textual inversion
    def load_embedding(self, path, token=None, key="text_encoder", expand=None):
        """Add the vectors of an embedding file under `token` (default: the file's own name, else
        its stem); returns the tokens added. Nothing changes on any error.

        `expand`: how `tok` alone in a prompt stands for all of a multi-vector embedding's
        tokens. None: as diffusers (`convert_prompt`: the prompt text is rewritten where it spells
        `tok` exactly as loaded; a mixed-case token is never rewritten and reads its first vector
        only, diffusers' quirk). True: wherever the tokenizer finds `tok`, as A1111 does."""
        file_token, vectors = textual_inversion.read_embedding(path)
        if key not in vectors:
            raise textual_inversion.EmbeddingError(
                f"embedding file {path!r} holds vectors for {', '.join(sorted(vectors))}; this model's text "
                f"encoder needs {key!r} (an SDXL embedding on an SD 1.x/2.x model?).")
        matrix = vectors[key]
        width = self.text_encoder.hidden_size
        if matrix.shape[1] != width:
            raise textual_inversion.EmbeddingError(
                f"embedding file {path!r} has vectors of width {matrix.shape[1]}; this model's text encoder is "
                f"{width} wide ({ {768: 'SD 1.x', 1024: 'SD 2.x', 1280: 'SDXL clip_g'}.get(matrix.shape[1], 'another model')} "
                "embedding?).")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError(f"token={token!r}; must be a non-empty word or None (the file's own name).")
        token = token if token is not None else textual_inversion.default_token(path, file_token)
        names = textual_inversion.expanded_tokens(token, len(matrix))
        if self.tokenizer.vocab_size != self.text_encoder.vocab_size + len(self._vectors):
            raise ValueError(
                f"the tokenizer has {self.tokenizer.vocab_size} ids but the text encoder reads "
                f"{self.text_encoder.vocab_size} + {len(self._vectors)} added: tokens cannot be added to this model.")
        self.tokenizer.add_tokens(names, expand=bool(expand))  # checks every name first; adds all or none
        self._vectors.extend(matrix)
        self.embeddings[token] = (path, names)
        if not expand and len(names) > 1:
            self._text_expansions[token] = " ".join(names)
        return names

    def unload_embeddings(self):
        self.tokenizer.remove_added_tokens()
        self._vectors, self.embeddings, self._text_expansions = [], {}, {}
