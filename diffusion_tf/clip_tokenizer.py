"""Byte-pair-encoding tokenizer of OpenAI CLIP, as used by Stable Diffusion's text encoder."""

import gzip
import html
import json
import os
import re
import warnings

import ftfy
import numpy as np
import regex

_DEFAULT_VOCAB = os.path.join(os.path.dirname(__file__), "data", "clip", "bpe_simple_vocab_16e6.txt.gz")
_NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP from the OpenAI vocabulary file
_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"
# How the pad token's text is tokenized where it occurs in a prompt (see CLIPTokenizer):
# "special": split out as the pad id, as transformers' CLIPTokenizer does; "text": ordinary BPE, as open_clip does.
PAD_TOKEN_IN_PROMPT = ("special", "text")
# No IGNORECASE (OpenAI has it; it is moot after lower() except that it makes U+0345 match nothing and vanish).
_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")
_MAX_CACHE = 100_000


def _bytes_to_unicode():
    """Map every byte to a printable character: printable latin-1 bytes to themselves, the rest to
    chr(256 + n). The dict order (printable bytes first) is the order of the 256 base vocabulary symbols."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def _clean(text):
    """ftfy fix, html unescape, whitespace collapse and lowercase (as OpenAI CLIP does)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip().lower()


def _pad_token_from(config):
    """Pad token string from a special_tokens_map.json / tokenizer_config.json dict, or None."""
    token = config.get("pad_token")
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else None


class CLIPTokenizer:
    """CLIP BPE tokenizer producing fixed-length int32 id arrays for the CLIP text encoder.

    With no files it uses the packaged OpenAI vocabulary; otherwise a diffusers/transformers
    `vocab.json` + `merges.txt` pair. `pad_token_id` is 49407 (EOS) for SD 1.x and 0 ("!") for SD 2.x.

    Special tokens are split out of the (cleaned) prompt before BPE, leftmost and longest first, as
    transformers' CLIPTokenizer splits out its added tokens: BOS "<|startoftext|>", EOS "<|endoftext|>"
    (CLIP's UNK is EOS too) and, with `pad_token_in_prompt="special"` (the default), the pad token's text.
    So with pad "!" the prompt "hello!!" is [hello</w>, 0, 0], the ids transformers and diffusers give (the
    reference this package matches), not [hello</w>, !!</w>].
    `pad_token_in_prompt="text"` tokenizes the pad token's text as ordinary text, as open_clip does (the
    tokenizer SD 2.x was trained with; diffusers issue #4153). With pad = EOS the two are the same.
    """

    PAD_TOKEN_IN_PROMPT = PAD_TOKEN_IN_PROMPT

    def __init__(self, vocab_file=None, merges_file=None, context_length=77, pad_token_id=49407,
                 pad_token_in_prompt="special"):
        if (vocab_file is None) != (merges_file is None):
            raise ValueError("vocab_file and merges_file must be given together (or neither).")
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}.")
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        if vocab_file is None:
            with gzip.open(_DEFAULT_VOCAB, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")[1 : _NUM_MERGES + 1]
            merges = [tuple(line.split()) for line in lines]
            symbols = list(self.byte_encoder.values())
            tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [_BOS, _EOS]
            self.encoder = {token: i for i, token in enumerate(tokens)}
        else:
            with open(vocab_file, encoding="utf-8") as f:
                self.encoder = json.load(f)
            with open(merges_file, encoding="utf-8") as f:
                lines = [line for line in f.read().split("\n") if line and not line.startswith("#version")]
            merges = [tuple(line.split()) for line in lines]
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_token_id = self.encoder[_BOS]
        self.eos_token_id = self.encoder[_EOS]
        self.context_length = int(context_length)
        self._pad_token_id = self.eos_token_id
        self.pad_token_in_prompt = pad_token_in_prompt
        self.added_tokens = {}  # token text (as a prompt is cleaned: lower case) -> id, after the vocabulary
        self._expansions = {}  # first id of a multi-vector token -> all its ids (diffusers' tok, tok_1, ...)
        self.pad_token_id = pad_token_id
        self._cache = {}

    @property
    def pad_token_id(self):
        return self._pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value not in self.decoder:
            raise ValueError(
                f"pad_token_id must be an integer id of the vocabulary (0..{len(self.decoder) - 1}), got {value!r}."
            )
        self._pad_token_id = int(value)
        self._compile_special()

    @property
    def pad_token_in_prompt(self):
        return self._pad_token_in_prompt

    @pad_token_in_prompt.setter
    def pad_token_in_prompt(self, value):
        if not isinstance(value, str) or value not in PAD_TOKEN_IN_PROMPT:
            raise ValueError(
                f"pad_token_in_prompt must be one of {', '.join(map(repr, PAD_TOKEN_IN_PROMPT))}, got {value!r}."
            )
        self._pad_token_in_prompt = value
        self._compile_special()

    def _compile_special(self):
        """The regex that splits special tokens out of a prompt: BOS, EOS and, in "special" mode, the pad token."""
        specials = {_BOS, _EOS} | set(getattr(self, "added_tokens", ()))
        if self._pad_token_in_prompt == "special":
            specials.add(self.decoder[self._pad_token_id])
        # Longest first: at any position the regex takes the first alternative that matches, so this is
        # the leftmost-longest match of transformers' added-token splitting (e.g. "!" vs "!</w>").
        alternatives = sorted(specials, key=lambda t: (-len(t), t))
        self._special = regex.compile("(" + "|".join(map(regex.escape, alternatives)) + ")")

    @property
    def vocab_size(self):
        """Ids in use: the vocabulary's and the added tokens' (textual inversion)."""
        return len(self.decoder)

    def add_tokens(self, tokens, expand=True):
        """Add new words (textual-inversion tokens) after the vocabulary; returns their ids, in order.

        Each is split out of a prompt wherever it occurs, as transformers' added tokens are. A token
        that is already a vocabulary entry or an added token is a ValueError (as in diffusers), and
        then nothing is added. `expand`: with several tokens (diffusers' `tok`, `tok_1`, ...), the
        first alone in a prompt stands for all of them."""
        tokens = list(tokens)
        cleaned = [_clean(t) for t in tokens]
        for token, clean in zip(tokens, cleaned):
            if not isinstance(token, str) or not clean or clean != token.strip().lower() or " " in clean:
                raise ValueError(f"token {token!r}: must be one word without spaces.")
            if clean in self.encoder or clean + "</w>" in self.encoder or clean in self.added_tokens:
                raise ValueError(
                    f"token {token!r} is already in the tokenizer's vocabulary; choose another token "
                    "(or unload the embedding that added it)."
                )
        if len(set(cleaned)) != len(cleaned):
            raise ValueError(f"tokens {tokens!r} repeat a token.")
        ids = list(range(len(self.decoder), len(self.decoder) + len(tokens)))
        for clean, i in zip(cleaned, ids):
            self.added_tokens[clean] = i
            self.decoder[i] = clean
        if expand and len(ids) > 1:
            self._expansions[ids[0]] = ids
        self._compile_special()
        return ids

    def added_tokens_in(self, text):
        """The added tokens (as stored: cleaned) that tokenizing `text` splits out."""
        parts = self._special.split(_clean(text))
        return {p for p in parts[1::2] if p in self.added_tokens}

    def remove_last_added(self, count):
        """Forget the `count` tokens added last (undoing one `add_tokens` call)."""
        for i in sorted(self.added_tokens.values())[len(self.added_tokens) - count:]:
            clean = self.decoder.pop(i)
            del self.added_tokens[clean]
            self._expansions.pop(i, None)
        self._compile_special()

    def remove_added_tokens(self):
        """Forget every added token (the vocabulary is as loaded)."""
        for clean, i in self.added_tokens.items():
            del self.decoder[i]
        self.added_tokens, self._expansions = {}, {}
        self._compile_special()

    @classmethod
    def from_folder(cls, path, context_length=77, pad_token_in_prompt="special"):
        """Load a diffusers/transformers tokenizer folder (vocab.json, merges.txt, optional pad token).

        A folder with only special_tokens_map.json / tokenizer_config.json uses the packaged vocabulary.
        """
        pad_token = _EOS
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # later file wins
            config_path = os.path.join(path, name)
            if os.path.exists(config_path):
                with open(config_path, encoding="utf-8") as f:
                    pad_token = _pad_token_from(json.load(f)) or pad_token
        files = [os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")]
        if not os.path.isfile(files[0]):  # only the special tokens: the packaged vocabulary
            files = [None, None]
        tokenizer = cls(*files, context_length=context_length, pad_token_in_prompt=pad_token_in_prompt)
        if pad_token not in tokenizer.encoder:
            raise ValueError(f"pad token {pad_token!r} from {path} is not in the vocabulary.")
        tokenizer.pad_token_id = tokenizer.encoder[pad_token]
        return tokenizer

    def get_config(self):
        """Constructor arguments; `pad_token_in_prompt` only where it is not the default "special"."""
        config = {"context_length": self.context_length, "pad_token_id": self.pad_token_id}
        if self.pad_token_in_prompt != "special":
            config["pad_token_in_prompt"] = self.pad_token_in_prompt
        return config

    def save_vocabulary(self, folder):
        """Write `vocab.json` and `merges.txt` as transformers' CLIPTokenizer reads them; returns the paths."""
        os.makedirs(folder, exist_ok=True)
        vocab_path = os.path.join(folder, "vocab.json")
        merges_path = os.path.join(folder, "merges.txt")
        with open(vocab_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.encoder, indent=2, ensure_ascii=False) + "\n")
        with open(merges_path, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n")
            for pair, _ in sorted(self.bpe_ranks.items(), key=lambda item: item[1]):
                f.write(" ".join(pair) + "\n")
        return vocab_path, merges_path

    def _bpe(self, token):
        """Split one pre-token (already mapped to byte symbols) into BPE symbols."""
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            best = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[token] = word
        return word

    def encode(self, text):
        """Token ids of `text`, without BOS/EOS and without truncation."""
        ids = []
        # Special tokens are split out of the cleaned text first, then each remaining segment is
        # pre-tokenized by CLIP's pattern (OpenAI's single regex would let a preceding punctuation run
        # swallow the "<|"). regex.split with one group: the odd-indexed parts are the matches.
        for i, segment in enumerate(self._special.split(_clean(text))):
            if i % 2:
                first = self.added_tokens.get(segment, self.encoder.get(segment))
                ids.extend(self._expansions.get(first, [first]))
                continue
            for piece in _PATTERN.findall(segment):
                symbols = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
                ids.extend(self.encoder[s] for s in self._bpe(symbols))
        return ids

    def decode(self, ids):
        """Text of token ids (end-of-word markers become spaces)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, prompts):
        """int32 array [batch, context_length]: BOS + ids + EOS, truncated, then padded."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a str or a list of str, got {prompts!r} ({type(prompts).__name__}).")
        if not prompts:
            raise ValueError("prompts must be a str or a non-empty list of str, got an empty list.")
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise ValueError(
                    f"each prompt must be a str (prompts: a str or a list of str), got {prompt!r} "
                    f"({type(prompt).__name__})."
                )
        out = np.full((len(prompts), self.context_length), self.pad_token_id, dtype=np.int32)
        keep = self.context_length - 2
        for row, prompt in enumerate(prompts):
            ids = self.encode(prompt)
            if len(ids) > keep:
                warnings.warn(
                    "The following part of your prompt was truncated because CLIP can only handle sequences "
                    f"up to {self.context_length} tokens: {self.decode(ids[keep:])!r}",
                    UserWarning,
                    stacklevel=2,
                )
                ids = ids[:keep]
            tokens = [self.bos_token_id, *ids, self.eos_token_id]
            out[row, : len(tokens)] = tokens
        return out
