"""Write tests/fixtures/tokenizer_ids.json: reference CLIP token ids from `transformers.CLIPTokenizer`.

Needs `transformers` (and `ftfy`). The reference tokenizer is loaded from the vocab.json / merges.txt
that our package-data vocabulary writes via `CLIPTokenizer.save_vocabulary`.

transformers 5 only ships the fast (Rust `tokenizers`) CLIPTokenizer, which normalizes text with
NFC + whitespace collapse + lowercase only. OpenAI CLIP (and transformers' old slow tokenizer, which
Stable Diffusion was trained with) first runs ftfy.fix_text and html.unescape. So the expected ids are
the reference's ids for the OpenAI-cleaned prompt; where the fast tokenizer on the raw prompt gives
different ids, those are recorded as well (`reference_raw_ids_pad49407`) for information.

Pad 0 (SD 2.x): `ids_pad0` are the reference's ids padded with 0. A transformers tokenizer loaded with
pad_token "!" (as diffusers' SD 2.x tokenizer folders are) also turns every "!" inside the prompt into the
special token 0, unlike open_clip / OpenAI (https://github.com/huggingface/diffusers/issues/4153); we follow
open_clip, and record the "!"-as-pad-token ids as `reference_pad_bang_ids` where they differ.

Usage: python scripts/make_tokenizer_fixtures.py [--check]   (--check: compare only, write nothing)
"""

import argparse
import html
import json
import os
import re
import sys
import tempfile
import warnings

import ftfy
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from diffusion_tf.clip_tokenizer import CLIPTokenizer  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer_ids.json")
CONTEXT_LENGTH = 77

LONG_PROMPT = (
    "a breathtaking panoramic landscape of an ancient mountain valley at golden hour, with a winding river "
    "reflecting the warm orange sky, towering snow capped peaks in the distance, dense pine forests covering "
    "the slopes, a small wooden cabin with smoke rising from its chimney, wildflowers in red yellow and purple "
    "scattered across the meadow, a herd of deer grazing near the water, soft volumetric light rays piercing "
    "through drifting clouds, mist hanging low over the lake, highly detailed, ultra realistic, cinematic "
    "composition, dramatic lighting, sharp focus, award winning photograph, shot on a medium format camera "
    "with a wide angle lens, rich colors, intricate textures, masterpiece, trending on artstation, octane "
    "render, eight k resolution, by a famous landscape painter of the nineteenth century"
)

PROMPTS = [
    "a photo of a cat",
    "A photograph of an astronaut riding a horse on Mars, highly detailed, 8k",
    "Hello, World!!! What's up? I'm fine; you'll see -- it's 'quoted' & \"double\".",
    "don't won't can't shouldn't've y'all THEY'RE WE'VE",
    "numbers 0123456789 3.14159 1,000,000 2024-01-31 #42 $99.99 50%",
    "café naïve résumé façade Ångström Zürich São Paulo",
    "Ünïcödé ÀÉÎÕÜ crème brûlée",
    "e\u0301 combining acute vs é precomposed",
    "ypogegrammeni l\u0345 x\u0345y (U+0345)",
    "a cat 🐱 with a dog 🐶 under a rainbow 🌈, astronaut 👩‍🚀 flag 🇯🇵 👍🏽",
    "一只猫坐在窗台上看雨",
    "東京の夜景、ネオンサイン",
    "한국어 텍스트 프롬프트",
    "قطة تجلس على السجادة الحمراء",
    "חתול יושב על השטיח",
    "Привет мир, рыжая кошка",
    "Ελληνικά: ΟΔΟΣ ΣΑΣ",
    "हिन्दी पाठ और चित्र",
    "ภาษาไทย สวัสดี",
    "a <|endoftext|> b",
    "<|startoftext|>a painting<|endoftext|>",
    "<|ENDOFTEXT|> upper-case special token",
    "wow!<|startoftext|>again<|endoftext|>!! (<|endoftext|>)",
    "@" * 100,
    "! !! !!! wow!",
    "",
    "   \t  \n  ",
    "MiXeD CaSe PrOmPt With CAPS",
    "fish &amp; chips &lt;3 &quot;tasty&quot; &#39;yum&#39; &amp;amp;",
    "Ã©lÃ©phant dans la forÃªt, the Mona Lisa doesnÃ¢â‚¬â„¢t have eyebrows",
    "“smart quotes” and ‘single’ — em-dash … ellipsis",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３，ｏｋ",
    "ﬁne ﬂour",
    "line one\nline two\ttabbed\r\nline three",
    "oil painting, trending on artstation, by greg rutkowski, ((masterpiece)), [detailed:1.2]",
    "https://example.com/path?query=1&x=y email@example.org",
    "snake_case camelCase kebab-case CONSTANT_CASE",
    "𝕗𝕒𝕟𝕔𝕪 𝓉𝑒𝓍𝓉",
    "\u200bzero\u200bwidth\u200b and a\u00a0non-breaking\u00a0space",
    "x" * 300,
    "cat " * 75,
    "cat " * 76,
    LONG_PROMPT,
]


def openai_clean(text):
    """The text cleaning of OpenAI CLIP's SimpleTokenizer (basic_clean + whitespace_clean + lower)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip().lower()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare only, do not write the fixture")
    args = parser.parse_args()

    ours = CLIPTokenizer()
    ours_pad0 = CLIPTokenizer(pad_token_id=0)
    with tempfile.TemporaryDirectory() as folder:
        ours.save_vocabulary(folder)
        ref = transformers.CLIPTokenizer.from_pretrained(folder)
        ref_pad0 = transformers.CLIPTokenizer.from_pretrained(folder, pad_token="!")
    assert ref.pad_token_id == 49407 and ref_pad0.pad_token_id == 0, (ref.pad_token_id, ref_pad0.pad_token_id)
    ref_class = f"{type(ref).__module__}.{type(ref).__qualname__}"
    print(f"reference: {ref_class} (transformers {transformers.__version__}, fast={ref.is_fast})")

    def ref_ids(tokenizer, text, pad_id=None):
        if pad_id is None:
            kwargs = dict(padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)
            return list(tokenizer(text, **kwargs)["input_ids"])
        ids = list(tokenizer(text, max_length=CONTEXT_LENGTH, truncation=True)["input_ids"])
        return ids + [pad_id] * (CONTEXT_LENGTH - len(ids))

    cases, mismatches = [], 0
    for prompt in PROMPTS:
        cleaned = openai_clean(prompt)
        case = {
            "prompt": prompt,
            "ids_pad49407": ref_ids(ref, cleaned),
            "ids_pad0": ref_ids(ref, cleaned, pad_id=0),
        }
        assert ref_ids(ref, cleaned, pad_id=49407) == case["ids_pad49407"]
        bang = ref_ids(ref_pad0, cleaned)
        if bang != case["ids_pad0"]:
            case["reference_pad_bang_ids"] = bang
            print(f"note: reference loaded with pad_token '!' differs for {prompt[:60]!r}")
        raw = ref_ids(ref, prompt)
        if raw != case["ids_pad49407"]:
            case["reference_raw_ids_pad49407"] = raw
            print(f"note: fast reference on the raw (un-ftfy'd) text differs for {prompt[:60]!r}")
        for key, tok in (("ids_pad49407", ours), ("ids_pad0", ours_pad0)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                got = tok(prompt)[0].tolist()
            if got != case[key]:
                mismatches += 1
                print(f"MISMATCH ({key}) {prompt[:60]!r}\n  ours {got}\n  ref  {case[key]}")
        cases.append(case)

    if mismatches:
        print(f"{mismatches} mismatches; fixture not written")
        return 1
    print(f"all {len(cases)} prompts agree (both pad ids)")
    if args.check:
        return 0
    header = {
        "reference_class": ref_class,
        "reference_is_fast": bool(ref.is_fast),
        "transformers_version": transformers.__version__,
        "ftfy_version": ftfy.__version__,
        "context_length": CONTEXT_LENGTH,
        "note": "ids = reference applied to the OpenAI-cleaned prompt (ftfy.fix_text, html.unescape x2, "
        "whitespace collapse, lowercase); reference_raw_ids_pad49407 = the fast reference on the raw prompt, "
        "present only where it differs (transformers 5's fast tokenizer does no ftfy/html cleaning). "
        "ids_pad0 = reference ids padded with 0; reference_pad_bang_ids = a reference loaded with pad_token '!' "
        "(diffusers' SD 2.x folders), present only where it differs: it maps every '!' in the text to 0, "
        "open_clip does not (diffusers issue #4153).",
    }
    # One line per id list keeps the file small and readable.
    lines = ["{"]
    lines += [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in header.items()]
    lines.append('  "cases": [')
    for i, case in enumerate(cases):
        fields = [f"    {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in case.items()]
        lines.append("   {\n" + ",\n".join(fields) + "\n   }" + ("," if i + 1 < len(cases) else ""))
    lines += ["  ]", "}"]
    text = "\n".join(lines) + "\n"
    assert json.loads(text)["cases"] == cases
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {os.path.normpath(FIXTURE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
