"""The `[data]` section of a recipe: sources, cleaning, tokenizer, split and mixture.

A minimal recipe needs only `dir`; with no `[[data.sources]]` the built-in synthetic mixture is used, so a
fresh checkout can prepare data and train without downloading anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from tinylm import config

SOURCE_TYPES = ("text", "jsonl", "parquet", "hf", "synthetic")
JSON_FORMATS = ("auto", "text", "chat", "prompt_completion", "gsm8k")
MIXTURE_METHODS = ("manual", "temperature", "influence", "regmix")


@dataclass
class SourceConfig:
    """One named source of documents."""

    name: str = ""
    """Name of the source: its shard folder, its key in mixture weights and reports. Letters, digits, `-`, `_`."""

    type: str = "text"
    """Where documents come from: `text` (.txt/.md files or folders), `jsonl`, `parquet`, `hf` (a Hugging Face
    dataset by name, needs `datasets`) or `synthetic` (a built-in generator, see `generator`)."""

    path: str = ""
    """File, folder or glob for `text`/`jsonl`/`parquet` (relative paths are relative to the recipe's working
    directory); the dataset name for `hf`."""

    format: str = "auto"
    """How a JSON Lines/Parquet/HF record becomes a document: `text` (the `text_field`), `chat` (a `messages`
    list of {role, content}), `prompt_completion` (`prompt_field` then `completion_field`), `gsm8k` (`question`
    then `answer`) or `auto` (the first of those that the record has)."""

    text_field: str = "text"
    """Record field holding the document for the `text` format."""

    messages_field: str = "messages"
    """Record field holding the chat turns for the `chat` format."""

    prompt_field: str = "prompt"
    """Record field holding the prompt for the `prompt_completion` format."""

    completion_field: str = "completion"
    """Record field holding the completion for the `prompt_completion` format."""

    data_files: str = ""
    """`hf` only: comma-separated files passed to `datasets.load_dataset(path, data_files=...)`, for example a
    local JSON file with `path = "json"`."""

    hf_config: str = ""
    """Configuration (subset) name of a Hugging Face dataset; empty for the default."""

    split: str = "train"
    """Split to read: of a Hugging Face dataset, or of a synthetic generator (`train`; `test` is for evaluation)."""

    chunk_chars: int = 0
    """Cut each text file into documents of about this many characters at blank lines (or line ends, or spaces
    in a longer line); 0 keeps every file one document. A single large file (tiny Shakespeare) needs this to
    have a validation split. Any document is cut into pieces of at most 100,000 characters (see
    `tinylm.data.sources.MAX_DOC_CHARS`), which keeps preparation's memory bounded."""

    max_docs: int = 0
    """Read at most this many documents (before cleaning); 0 reads all."""

    shuffle: bool = False
    """Shuffle the documents (seeded by `seed`) before `max_docs` takes the first ones, so that a smaller set
    is a sample of the whole source rather than its beginning."""

    held_out: str = ""
    """A classification task (a spec of `tinylm.data.classify_tasks`, e.g. `shakespeare-speakers`) whose test
    texts are left out of this source: every blank-line block of a `text` source, or every document of the
    other types, that contains one of them (whitespace aside) is dropped, so that pretraining never sees the
    texts a fine-tuned model is scored on. The task is split with this source's `seed` and the default test
    fraction, which must be what the task is evaluated with."""

    generator: str = ""
    """Synthetic generator: arithmetic, word_problems, counting, comparison, sorting, units or stories."""

    num_docs: int = 2000
    """Number of documents a synthetic generator produces."""

    difficulty: int = 2
    """Synthetic difficulty from 1 (small operands, one or two steps) to 5 (large operands, many steps)."""

    chat: bool = False
    """Synthetic only: produce chat `messages` (user question, assistant worked answer) instead of plain text.
    Chat documents are tokenized with the role markers of `tinylm.data.tokenizer`."""

    seed: int = 0
    """Seed of a synthetic generator, of `shuffle` and of the `held_out` task's split; the same seed always gives
    the same documents."""

    quality: Optional[bool] = None
    """Apply the Gopher-style quality filters of `[data.clean]`; unset means on for every type except
    `synthetic`, whose generated text is clean by construction and full of short numerals."""

    def __post_init__(self):
        config.at_least(self, 0, "chunk_chars max_docs seed")
        config.at_least(self, 1, "num_docs")
        config.check(self, "difficulty", lambda v: 1 <= v <= 5, "from 1 to 5")


@dataclass
class CleanConfig:
    """Cleaning rules applied to each source in turn; every document removed is counted under its rule."""

    min_chars: int = 20
    """Drop documents shorter than this many characters after normalization."""

    min_words: int = 3
    """Drop documents with fewer words than this."""

    exact_dedup: bool = True
    """Drop documents whose normalized text (NFC, case-folded, whitespace collapsed) was already seen in the source."""

    near_dedup: bool = True
    """Drop near-duplicates found with MinHash LSH over word shingles."""

    near_dedup_threshold: float = 0.8
    """Estimated Jaccard similarity of word-shingle sets above which a document counts as a near-duplicate."""

    near_dedup_shingle: int = 5
    """Words per shingle for near-duplicate detection."""

    near_dedup_num_perm: int = 128
    """MinHash permutations: more is more exact and slower."""

    min_mean_word_length: float = 3.0
    """Quality: drop documents whose mean word length (characters) is below this."""

    max_mean_word_length: float = 10.0
    """Quality: drop documents whose mean word length is above this."""

    max_symbol_word_ratio: float = 0.1
    """Quality: drop documents with more than this many `#` runs and ellipses per word."""

    max_ellipsis_line_share: float = 0.3
    """Quality: drop documents in which more than this share of lines end in an ellipsis."""

    max_repeated_ngram_share: float = 0.3
    """Quality: drop documents in which more than this share of word characters lie in repeated n-grams.
    (Gopher's 5-gram/0.15 rule is written for web pages; it removes 14% of GSM8K, whose worked answers
    repeat the question's phrases, while 10-grams at 0.3 remove under 1% and still catch boilerplate.)"""

    repeated_ngram_n: int = 10
    """Length in words of the n-grams counted by `max_repeated_ngram_share`."""

    def __post_init__(self):
        config.at_least(self, 0, "min_chars min_words min_mean_word_length max_mean_word_length "
                                 "max_symbol_word_ratio")
        config.at_least(self, 1, "near_dedup_shingle near_dedup_num_perm repeated_ngram_n")
        config.fraction(self, "near_dedup_threshold max_ellipsis_line_share max_repeated_ngram_share")


@dataclass
class TokenizerConfig:
    """The tokenizer: trained on a sample of every source, or an existing `tokenizer.json`."""

    path: str = ""
    """An existing tokenizer.json to use instead of training one (Hugging Face `tokenizers` format)."""

    bos_token: str = ""
    """Beginning-of-document token of an existing tokenizer; empty: tinylm's `<|bos|>`, or the one named by a
    `tokenizer_config.json` or tinylm checkpoint (`tinylm import`) beside the tokenizer file."""

    eos_token: str = ""
    """End-of-text token of an existing tokenizer; empty: found as for `bos_token`."""

    vocab_size: int = 4096
    """Vocabulary size of a trained tokenizer, special tokens included; 0 sizes it from the training sample's
    length (`tinylm.data.tokenizer.fitted_vocab_size`), so that a small text is not cut into tokens too rare
    to learn."""

    min_frequency: int = 2
    """A pair is merged only if it occurs at least this often in the training sample."""

    sample_chars: int = 20_000_000
    """Characters of cleaned text the tokenizer is trained on, drawn from every source in proportion to size
    (each source gets at least its share of a uniform split, so a small source is not drowned out)."""

    seed: int = 0
    """Seed of the training-sample draw."""

    def __post_init__(self):
        config.at_least(self, 0, "min_frequency seed vocab_size")
        config.at_least(self, 1, "sample_chars")


@dataclass
class PhaseConfig:
    """One stretch of training with one mixture (pretraining, annealing, ...)."""

    name: str = "pretrain"
    """Name of the phase, shown in logs and the `mix` output."""

    start_fraction: float = 0.0
    """Where the phase begins, as a fraction of the total training tokens (the first phase starts at 0)."""

    method: str = ""
    """How the weights are set: `manual`, `temperature`, `influence` or `regmix`; empty uses `[data.mixture] method`."""

    weights: dict[str, float] = field(default_factory=dict)
    """`manual`: the weight of each source (normalized; unlisted sources get 0). Other methods: if given, only the
    listed sources take part."""

    def __post_init__(self):
        config.fraction(self, "start_fraction", below_one=True)
        config.one_of(self, "method", ("",) + MIXTURE_METHODS)
        config.check(self, "weights", lambda w: all(v >= 0 for v in w.values()), "non-negative")


@dataclass
class InfluenceConfig:
    """The MobileLLM-R1 influence method at small scale: a proxy model, several checkpoints, gradient alignment."""

    dim: int = 64
    """Width of the proxy model."""

    layers: int = 2
    """Depth of the proxy model."""

    heads: int = 4
    """Attention heads of the proxy model."""

    seq_len: int = 64
    """Context of the proxy model; samples are cut to this length."""

    steps: int = 60
    """Proxy training steps on the uniform mixture."""

    batch_size: int = 8
    """Rows per proxy training step."""

    lr: float = 3e-3
    """Proxy learning rate (AdamW)."""

    checkpoints: int = 3
    """Evenly spaced checkpoints at which samples are scored; checkpoint t of T is weighted t."""

    samples_per_source: int = 32
    """Training samples scored per source."""

    probe_samples: int = 16
    """Held-out samples per capability probe set."""

    seed: int = 0
    """Seed of the proxy initialization and the sample draws."""

    def __post_init__(self):
        config.at_least(self, 1, "dim layers heads seq_len steps batch_size checkpoints samples_per_source "
                                 "probe_samples")
        config.at_least(self, 0, "seed")
        config.positive(self, "lr")


@dataclass
class RegMixConfig:
    """RegMix: many tiny proxies on Dirichlet mixtures, a regression from weights to probe loss."""

    proxies: int = 16
    """Number of proxy runs."""

    steps: int = 30
    """Training steps of each proxy."""

    dim: int = 32
    """Width of each proxy model."""

    layers: int = 1
    """Depth of each proxy model."""

    heads: int = 2
    """Attention heads of each proxy model."""

    seq_len: int = 64
    """Context of each proxy model."""

    batch_size: int = 8
    """Rows per proxy step."""

    lr: float = 3e-3
    """Proxy learning rate (AdamW)."""

    concentration: float = 1.0
    """Dirichlet concentration around the token-count prior: small gives extreme mixtures, large near the prior."""

    candidates: int = 2000
    """Mixtures sampled from the same Dirichlet and ranked by the regression."""

    top_k: int = 10
    """The final mixture averages this many best-predicted candidates (more robust than the single best)."""

    seed: int = 0
    """Seed of the mixture draws and proxy initializations."""

    def __post_init__(self):
        config.at_least(self, 1, "proxies steps dim layers heads seq_len batch_size candidates top_k")
        config.at_least(self, 0, "seed")
        config.positive(self, "lr concentration")


@dataclass
class MixtureConfig:
    """Per-phase mixture weights over sources and the method that sets them."""

    method: str = "temperature"
    """Default method of every phase: `manual`, `temperature`, `influence` or `regmix`."""

    alpha: float = 0.7
    """`temperature`: weights proportional to tokens**alpha (1 is proportional to size, 0 is uniform)."""

    max_epochs: float = 4.0
    """No source is repeated more than this many times over the whole run (data-constrained scaling: about 4
    epochs are nearly as good as fresh data); weight above the cap goes to the other weighted sources, and for
    computed methods, once those are capped too, to the sources the method gave no weight."""

    probes: dict[str, list[str]] = field(default_factory=dict)
    """`influence`/`regmix`: capability name -> sources whose held-out (validation) documents form its probe set.
    Empty: one capability per source."""

    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    """The phases in training order."""

    influence: InfluenceConfig = field(default_factory=InfluenceConfig)
    """Settings of the `influence` method."""

    regmix: RegMixConfig = field(default_factory=RegMixConfig)
    """Settings of the `regmix` method."""

    def __post_init__(self):
        config.one_of(self, "method", MIXTURE_METHODS)
        config.at_least(self, 0, "alpha")
        config.positive(self, "max_epochs")


@dataclass
class DataConfig:
    """Where the prepared token shards live (see `tinylm.data.shards` for the layout) and how they are made."""

    dir: str = ""
    """Prepared data directory (manifest.json, tokenizer.json, per-source shards)."""

    sources: list[SourceConfig] = field(default_factory=list)
    """The sources; empty uses the built-in synthetic mixture (`tinylm.data.synthetic.default_sources`)."""

    clean: CleanConfig = field(default_factory=CleanConfig)
    """Cleaning rules."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer to train or reuse."""

    val_fraction: float = 0.02
    """Share of each source's documents held out for validation (at least one when the source has two or more)."""

    workers: int = 0
    """Processes for cleaning; 0 uses every core."""

    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """Mixture weights per phase."""

    def __post_init__(self):
        config.fraction(self, "val_fraction", below_one=True)
        config.at_least(self, 0, "workers")
