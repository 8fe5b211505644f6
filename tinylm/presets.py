"""Published model shapes (MobileLLM, arXiv 2402.14905; MobileLLM-R1, arXiv 2509.24945) and small ones for laptops.

Each preset is a dict of `ModelShape` fields; a recipe's `[model]` section may override any of them.
"""

from __future__ import annotations


def _shape(n_layers, dim, n_heads, n_kv_heads, ffn_dim, vocab_size, **extra):
    return dict(
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, ffn_dim=ffn_dim,
        vocab_size=vocab_size, **extra,
    )


_MOBILELLM = dict(rope_theta=10000.0, max_seq_len=2048, tie_embeddings=True, qk_norm=False)
_MOBILELLM_R1 = dict(rope_theta=500000.0, max_seq_len=4096, tie_embeddings=True, qk_norm=True)

PRESETS: dict[str, dict] = {
    # MobileLLM: Llama 2 tokenizer (32000), head dim 64, context 2048.
    "mobilellm-125m": _shape(30, 576, 9, 3, 1536, 32000, **_MOBILELLM),
    "mobilellm-350m": _shape(32, 960, 15, 5, 2560, 32000, **_MOBILELLM),
    "mobilellm-600m": _shape(40, 1152, 18, 6, 3072, 32000, **_MOBILELLM),
    "mobilellm-1b": _shape(54, 1280, 20, 5, 3584, 32000, **_MOBILELLM),
    # MobileLLM-LS: the same weights, every block applied twice in a row.
    "mobilellm-ls-125m": _shape(30, 576, 9, 3, 1536, 32000, block_repeats=2, **_MOBILELLM),
    "mobilellm-ls-350m": _shape(32, 960, 15, 5, 2560, 32000, block_repeats=2, **_MOBILELLM),
    # MobileLLM-R1: Llama 3 tokenizer (128256), QK-norm, context 4k.
    "mobilellm-r1-140m": _shape(15, 576, 9, 3, 2048, 128256, **_MOBILELLM_R1),
    "mobilellm-r1-360m": _shape(15, 1024, 16, 4, 4096, 128256, **_MOBILELLM_R1),
    "mobilellm-r1-950m": _shape(22, 1536, 24, 6, 6144, 128256, **_MOBILELLM_R1),
    # Laptop and test sizes: the same deep-and-thin proportions, vocabularies a small BPE reaches.
    "tiny": _shape(6, 192, 6, 2, 512, 4096, rope_theta=10000.0, max_seq_len=512, tie_embeddings=True, qk_norm=True),
    "small": _shape(12, 384, 6, 2, 1024, 8192, rope_theta=10000.0, max_seq_len=1024, tie_embeddings=True, qk_norm=True),
    "micro": _shape(2, 64, 4, 2, 128, 512, rope_theta=10000.0, max_seq_len=256, tie_embeddings=True, qk_norm=False),
    # Tiny Language Models (Gross et al.): bidirectional encoders at BERT-6's width and a one-layer BERT-1 at
    # the authors' 1536-wide variant; vocabularies are the tokenizer's. `tlm-bert-mini` fits a 2-core CPU.
    "tlm-bert-6": _shape(6, 768, 12, 12, 3072, 30522, rope_theta=10000.0, max_seq_len=128, tie_embeddings=True,
                         qk_norm=False, causal=False),
    "tlm-bert-1": _shape(1, 1536, 24, 24, 6144, 30522, rope_theta=10000.0, max_seq_len=128, tie_embeddings=True,
                         qk_norm=False, causal=False),
    "tlm-bert-mini": _shape(6, 96, 4, 4, 256, 2048, rope_theta=10000.0, max_seq_len=128, tie_embeddings=True,
                            qk_norm=False, causal=False),
}

# Parameter counts as published (value, unit of its last printed digit), tied embeddings counted once.
# Tests hold each preset to within 0.1%, or to the published rounding where that is coarser (1.01B).
PUBLISHED_PARAMS = {
    "mobilellm-125m": (124.6e6, 0.1e6),
    "mobilellm-350m": (345.3e6, 0.1e6),
    "mobilellm-600m": (603.1e6, 0.1e6),
    "mobilellm-1b": (1.01e9, 0.01e9),
    "mobilellm-r1-140m": (140.2e6, 0.1e6),
    "mobilellm-r1-360m": (359.4e6, 0.1e6),
    "mobilellm-r1-950m": (949.2e6, 0.1e6),
}
