"""The tokenizer a GGUF file describes, rebuilt with the `tokenizers` library from the file's metadata.

llama.cpp keeps no tokenizer.json: it stores the vocabulary, the merges, each token's type and the special
token ids. For byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`: SmolLM, Llama 3 and most BPE
models) the tokenizer is GPT-2's: byte-level pre-tokenizer and decoder, with the file's control tokens kept
whole as special tokens and its user-defined ones as plain added tokens, as transformers' GGUF loader does, so
both give the same ids. Other tokenizer models are refused by name.
"""

from __future__ import annotations

from tinylm.errors import UserError

# Pre-tokenizer splits by `tokenizer.ggml.pre` where it differs from GPT-2's built-in one.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {name: _LLAMA3_SPLIT for name in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx")}

HANDLED_MODELS = ("gpt2",)
CONTROL, USER_DEFINED = 3, 4
"""`tokenizer.ggml.token_type` values of special (control) tokens and of added, non-special ones."""


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, which byte-level vocabularies are spelled in."""
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    # The stand-ins are the printable bytes themselves, then U+0100 onwards for the others in byte order.
    printable = [b for b in range(256) if chr(b) in alphabet]
    others = [b for b in range(256) if chr(b) not in alphabet]
    spelling = {b: chr(b) for b in printable}
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def build_tokenizer(f):
    """A `tokenizers.Tokenizer` for the GGUF file `f` (a `GGUFFile`)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = f.need("tokenizer.ggml.model")
    if kind not in HANDLED_MODELS:
        raise UserError(f"{f.path}: tokenizer model {kind!r} is not handled (tinylm builds {', '.join(HANDLED_MODELS)})")
    tokens = list(f.need("tokenizer.ggml.tokens"))
    types = list(f.get("tokenizer.ggml.token_type") or [])
    merges = f.get("tokenizer.ggml.merges")
    if not merges:
        raise UserError(f"{f.path}: a byte-level BPE tokenizer needs tokenizer.ggml.merges, which is missing")
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    try:
        pairs = [tuple(m.split(" ")) for m in merges]
        tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    except Exception as e:  # tokenizers raises its own exception type for a merge naming an unknown token
        raise UserError(f"{f.path}: the tokenizer's vocabulary and merges do not fit together ({e})") from None
    split = SPLITS.get(f.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    # A control token spelled outside the byte alphabet is a mislabelled ordinary one: adding it would grow
    # the vocabulary past the embedding's size.
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in vocab])
    bos = f.get("tokenizer.ggml.bos_token_id")
    if f.get("tokenizer.ggml.add_bos_token", False) and isinstance(bos, int) and bos < len(tokens):
        name = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{name} $A", pair=f"{name} $A {name} $B",
                                                           special_tokens=[(name, bos)])
    return tok


def tokenizer_config(f, tok) -> dict:
    """What a Hugging Face `tokenizer_config.json` would say: special token names, BOS, the chat template."""
    tokens = f.need("tokenizer.ggml.tokens")
    cfg = {"add_bos_token": bool(f.get("tokenizer.ggml.add_bos_token", False)),
           "add_eos_token": bool(f.get("tokenizer.ggml.add_eos_token", False))}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = f.get(f"tokenizer.ggml.{key}")
        if isinstance(i, int) and 0 <= i < len(tokens):
            cfg[f"{name}_token"] = tokens[i]
    template = f.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg
