"""Prompts -> the UNet's cross-attention context: chunks, emphasis, clip skip, added tokens.

`TextConditioning` holds a model's tokenizers and text encoders ("towers": one for SD 1.x/2.x,
two for SDXL, the refiner's one) with the vectors of their added (textual-inversion) tokens.
`tokens(prompts)` runs on the host (Python BPE); `encode(ids, weights)` is TensorFlow and runs
inside the compiled generation:

1. each 77-token chunk goes through each text encoder on its own. SD 1.x/2.x: `clip_skip` layers
   from the end left out, then the final layer norm, as diffusers. SDXL (`pooled=True`): the
   penultimate layer's output (`clip_skip` more left out) without the final norm, each tower's
   concatenated along the features, as diffusers' SDXL `encode_prompt`; the pooled embedding is
   the last tower's projection of its first chunk (A1111 pools the first chunk too);
2. emphasis, as A1111's "Original" mode: each token's output vector times its weight, then the
   chunk rescaled so that its mean is the unweighted one's (per tower, as A1111's SDXL embedders). The mean is taken per prompt and chunk
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


def check_clip_skip(clip_skip, text_encoder, name="clip_skip", reserved=0):
    """None (0) or an integer 0 <= clip_skip < the encoder's layer count (less `reserved`: SDXL
    already leaves the last layer out). `text_encoder`: one encoder or a list (the shallowest
    counts)."""
    encoders = text_encoder if isinstance(text_encoder, (list, tuple)) else [text_encoder]
    layers = min(e.num_hidden_layers for e in encoders) - reserved
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
    """Tokenizers and their text encoders, with added tokens (see the module docstring).

    `towers`: [(component name, tokenizer, text encoder)], e.g. [("text_encoder", tok, enc)] for
    SD 1.x/2.x, [("text_encoder", ...), ("text_encoder_2", ...)] for SDXL. `pooled`: SDXL's way
    (penultimate hidden states, a pooled embedding from the last tower)."""

    def __init__(self, towers, prompt_syntax="a1111", long_prompts="chunks", pooled=False):
        check_options(prompt_syntax, long_prompts)
        if not towers:
            raise ValueError("TextConditioning needs at least one (name, tokenizer, text encoder).")
        self.towers = list(towers)
        self.prompt_syntax, self.long_prompts, self.pooled = prompt_syntax, long_prompts, bool(pooled)
        if self.pooled and self.towers[-1][2].projection_dim is None:
            raise ValueError(f"pooled conditioning needs a last text encoder with a projection; "
                             f"{self.towers[-1][0]} has none.")
        self._vectors = {name: [] for name, _, _ in self.towers}  # one [D] row per added token id, in id order
        self.embeddings = {}  # token -> (path, its expanded tokens)
        self._text_expansions = {}  # multi-vector tokens expanded as diffusers does: token -> "tok tok_1 ..."

    @property
    def tokenizer(self):
        """The first tower's tokenizer (every tower's splits a prompt into the same tokens)."""
        return self.towers[0][1]

    @property
    def text_encoders(self):
        return [enc for _, _, enc in self.towers]

    @property
    def width(self):
        """The context's feature width (the towers' hidden sizes added up)."""
        return sum(enc.hidden_size for enc in self.text_encoders)

    @property
    def pooled_width(self):
        return self.towers[-1][2].projection_dim if self.pooled else None

    @property
    def text_layers(self):
        """How many layers clip skip can count from (clip_skip < this): the shallowest encoder's,
        one fewer for SDXL (which already conditions on the penultimate layer)."""
        return min(e.num_hidden_layers for e in self.text_encoders) - (1 if self.pooled else 0)

    def check_clip_skip(self, clip_skip, name="clip_skip"):
        return check_clip_skip(clip_skip, self.text_encoders, name, reserved=1 if self.pooled else 0)

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
        """(ids: a tuple with one int32 [B, k, 77] per tower, weights [B, k, 77] float32)."""
        prompts = [self.convert_prompt(p) for p in prompts]
        ids, weights = [], None
        for _, tokenizer, _ in self.towers:
            tower_ids, w = chunks.batch_chunks(tokenizer, prompts, syntax=self.prompt_syntax == "a1111",
                                               truncate=self.long_prompts == "truncate", min_chunks=min_chunks)
            ids.append(tower_ids)
            weights = w if weights is None else weights
        return tuple(ids), weights

    def pair(self, prompts, negatives):
        """The tokens of the prompts and of their negatives with one chunk count for both."""
        ids, weights = self.tokens(prompts)
        n_ids, n_weights = self.tokens(negatives, ids[0].shape[1])
        if n_ids[0].shape[1] > ids[0].shape[1]:
            ids, weights = self.tokens(prompts, n_ids[0].shape[1])
        return (ids, weights), (n_ids, n_weights)

    def extra_embeddings(self, tower=None):
        """[E, D] float32 vectors of the added tokens of the first tower (or the one named
        `tower`), or None when there are none."""
        vectors = self._vectors[tower or self.towers[0][0]]
        return np.stack(vectors) if vectors else None

    def all_extra_embeddings(self):
        """One `extra_embeddings` per tower (a tuple; entries None without added tokens)."""
        return tuple(self.extra_embeddings(name) for name, _, _ in self.towers)

    # ------------------------------------------------------------ graph side
    def encode(self, ids, weights, extra=None, clip_skip=0):
        """Token ids (one [B, k, T] per tower) and weights [B, k, T] -> (context [B, k T, D],
        pooled [B, P] or None). `extra`: one `extra_embeddings` per tower, or None."""
        t = self.tokenizer.context_length
        shape = ops.shape(weights)  # dynamic in a graph traced for several batch sizes or chunk counts
        b, k = shape[0], shape[1]
        extra = extra if extra is not None else (None,) * len(self.towers)
        parts, pooled = [], None
        for (_, _, encoder), tower_ids, tower_extra in zip(self.towers, ids, extra):
            flat = ops.reshape(tower_ids, (-1, t))
            if not self.pooled:
                z = encoder(flat, extra_embeddings=tower_extra, clip_skip=clip_skip)
            elif encoder.projection_dim is not None and encoder is self.towers[-1][2]:
                z, pool = encoder(flat, extra_embeddings=tower_extra, clip_skip=clip_skip + 1,
                                  final_norm=False, pooled=True)
                pooled = ops.reshape(pool, (b, k, -1))[:, 0]
            else:
                z = encoder(flat, extra_embeddings=tower_extra, clip_skip=clip_skip + 1, final_norm=False)
            d = z.shape[-1]
            parts.append(emphasize(ops.reshape(z, (b, k, t, d)), weights))
        z = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=-1)
        return ops.reshape(z, (b, k * t, z.shape[-1])), pooled

    # ------------------------------------------------------------ textual inversion
    def load_embedding(self, path, token=None, expand=None):
        """Add the vectors of an embedding file under `token` (default: the file's own name, else
        its stem); returns the tokens added. Nothing changes on any error. An SDXL file's
        `clip_l` vectors go to the first tower, its `clip_g` vectors to the second.

        `expand`: how `tok` alone in a prompt stands for all of a multi-vector embedding's
        tokens. None: as diffusers (`convert_prompt`: the prompt text is rewritten where it spells
        `tok` exactly as loaded; a mixed-case token is never rewritten and reads its first vector
        only, diffusers' quirk). True: wherever the tokenizer finds `tok`, as A1111 does."""
        file_token, vectors = textual_inversion.read_embedding(path)
        matrices = self._tower_vectors(path, vectors)
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise ValueError(f"token={token!r}; must be a non-empty word or None (the file's own name).")
        token = token if token is not None else textual_inversion.default_token(path, file_token)
        names = textual_inversion.expanded_tokens(token, len(matrices[0]))
        for (name, tokenizer, encoder) in self.towers:
            if tokenizer.vocab_size != encoder.vocab_size + len(self._vectors[name]):
                raise ValueError(
                    f"the tokenizer has {tokenizer.vocab_size} ids but the text encoder reads "
                    f"{encoder.vocab_size} + {len(self._vectors[name])} added: tokens cannot be added to this model.")
        added = []
        try:
            for (_, tokenizer, _) in self.towers:  # each checks every name first; adds all or none
                tokenizer.add_tokens(names, expand=bool(expand))
                added.append(tokenizer)
        except ValueError:
            for tokenizer in added:
                tokenizer.remove_last_added(len(names))
            raise
        for (name, _, _), matrix in zip(self.towers, matrices):
            self._vectors[name].extend(matrix)
        self.embeddings[token] = (path, names)
        if not expand and len(names) > 1:
            self._text_expansions[token] = " ".join(names)
        return names

    def _tower_vectors(self, path, vectors):
        """One [n, D] matrix per tower from a file's {key: vectors}; EmbeddingError otherwise."""
        if len(self.towers) == 1 and "text_encoder" in vectors:
            keys = ["text_encoder"]
        elif len(self.towers) == 1 and self.pooled and "clip_g" in vectors:
            keys = ["clip_g"]  # the SDXL refiner: only the bigG encoder
        elif len(self.towers) == 2 and set(textual_inversion.SDXL_KEYS) <= set(vectors):
            keys = list(textual_inversion.SDXL_KEYS)
        else:
            sdxl_file = bool(set(vectors) & set(textual_inversion.SDXL_KEYS))
            if len(self.towers) == 2:
                wanted = "clip_l and clip_g (an SDXL embedding, one set of vectors per text encoder)"
                hint = (" (an SD 1.x/2.x embedding on an SDXL model?)" if "text_encoder" in vectors else
                        " (a clip_g-only file is for the SDXL refiner, which has only that encoder)"
                        if "clip_g" in vectors else "")
            elif self.pooled:
                wanted = "clip_g (the SDXL refiner has only the second, OpenCLIP bigG, text encoder)"
                hint = ""
            else:
                wanted = "'text_encoder' (an SD 1.x/2.x embedding)"
                hint = " (an SDXL embedding on an SD 1.x/2.x model?)" if sdxl_file else ""
            raise textual_inversion.EmbeddingError(
                f"embedding file {path!r} holds vectors for {', '.join(sorted(vectors))}; this model needs "
                f"{wanted}{hint}.")
        matrices = [vectors[k] for k in keys]
        if len({len(m) for m in matrices}) != 1:
            raise textual_inversion.EmbeddingError(
                f"embedding file {path!r}: clip_l and clip_g hold different vector counts "
                f"({', '.join(str(len(m)) for m in matrices)}).")
        for (name, _, encoder), matrix in zip(self.towers, matrices):
            width = encoder.hidden_size
            if matrix.shape[1] != width:
                raise textual_inversion.EmbeddingError(
                    f"embedding file {path!r} has vectors of width {matrix.shape[1]}; this model's {name} is "
                    f"{width} wide ({ {768: 'SD 1.x', 1024: 'SD 2.x', 1280: 'SDXL clip_g'}.get(matrix.shape[1], 'another model')} "
                    "embedding?).")
        return matrices

    def unload_embeddings(self):
        for _, tokenizer, _ in self.towers:
            tokenizer.remove_added_tokens()
        self._vectors = {name: [] for name, _, _ in self.towers}
        self.embeddings, self._text_expansions = {}, {}
