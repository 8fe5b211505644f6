import unicodedata

from tinylm.data.clean import RULES, clean_documents, quality_failure, repeated_ngram_share
from tinylm.data.config import CleanConfig

PROSE = [
    "The river ran past the mill where the old miller kept his grain in a wooden loft above the wheel.",
    "In spring the orchard filled with blossom and the bees worked from dawn until the light went grey.",
    "A lighthouse keeper wrote letters every night and sent them with the supply boat each second week.",
    "Children at the village school learned to count with shells gathered from the beach after storms.",
]

LONG = [
    "Merchants crossed the northern pass with salt, copper and dyed wool, trading at every inn along the road.",
    "The astronomer measured the height of each star with a brass quadrant and logged the numbers by candle.",
    "Fishermen mended nets on the quay while gulls argued over scraps near the harbour wall at low tide.",
    "Her grandmother baked rye loaves on Fridays and traded them for eggs, cheese and news from the valley.",
]


def test_planted_exact_and_near_duplicates_are_removed_and_counted():
    long_doc = " ".join(PROSE + LONG)
    near = long_doc.replace("orchard", "garden", 1)
    docs = PROSE + [PROSE[0], "  " + PROSE[1].upper() + "  ", long_doc, near, "", "too short"]
    kept, report = clean_documents(docs, CleanConfig(), quality=True)
    removed = report["removed"]
    assert removed["exact_duplicate"] == 2
    assert removed["near_duplicate"] == 1
    assert removed["empty"] == 1 and removed["too_short"] == 1
    assert report["input"] == report["kept"] + sum(removed.values())
    assert kept == PROSE + [long_doc]
    assert list(removed) == list(RULES)


def test_near_dedup_threshold_is_configurable():
    a = " ".join(PROSE)
    b = a.replace("grain", "corn").replace("bees", "wasps").replace("letters", "notes")
    assert clean_documents([a, b], CleanConfig(near_dedup_threshold=0.5), quality=False)[1]["removed"]["near_duplicate"] == 1
    assert clean_documents([a, b], CleanConfig(near_dedup_threshold=0.95), quality=False)[1]["removed"]["near_duplicate"] == 0


def test_nfc_normalization_is_applied_and_counted():
    decomposed = unicodedata.normalize("NFD", "Café society gathered beside the fountain every single evening.")
    kept, report = clean_documents([decomposed], CleanConfig(), quality=True)
    assert kept == [unicodedata.normalize("NFC", decomposed)]
    assert report["nfc_changed"] == 1


def test_each_quality_rule_fires():
    cfg = CleanConfig(repeated_ngram_n=3, max_repeated_ngram_share=0.3)
    assert quality_failure("a b c d e f g h i j k", cfg) == "mean_word_length"
    assert quality_failure("supercalifragilistic antidisestablishment " * 3, cfg) == "mean_word_length"
    assert quality_failure("#tag #other words here #more #and #again", cfg) == "symbol_word_ratio"
    ellipsis = "\n".join(["and then it went on...", "and again we waited...", "the story told here"])
    assert quality_failure(ellipsis, CleanConfig(max_symbol_word_ratio=1)) == "ellipsis_lines"
    assert quality_failure("buy cheap shoes now " * 6, cfg) == "repeated_ngrams"
    assert quality_failure(PROSE[0], cfg) is None


def test_quality_rules_are_counted_and_can_be_off():
    spam = "buy cheap shoes now buy cheap shoes now buy cheap shoes now buy cheap shoes now buy cheap shoes now"
    cfg = CleanConfig(repeated_ngram_n=3)
    assert clean_documents([spam], cfg, quality=True)[1]["removed"]["repeated_ngrams"] == 1
    assert clean_documents([spam], cfg, quality=False)[0] == [spam]


def test_repeated_ngram_share_bounds():
    assert repeated_ngram_share("one two three".split(), 5) == 0
    assert repeated_ngram_share("x y x y x y".split(), 2) == 1


def test_batched_scan_matches_the_per_document_rules_and_datasketch():
    import random

    import numpy as np
    from datasketch import MinHash

    from tinylm.data.clean import dedup_key, scan_documents
    from tinylm.data.minhash import banding, shingle_hashes

    rng = random.Random(3)
    vocab = "the a mill river Straße grain ... #tag wheel old CAFÉ bees light, went grey!".split() + ["\u2026"]
    docs = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 60))) for _ in range(300)]
    docs += ["buy cheap shoes now " * 6, "one two", "", "x y x y x y x y x y x y x y x y x y x y"]
    cfg = CleanConfig(repeated_ngram_n=3)
    for (text, _, rule, key, sig, bands), raw in zip(scan_documents(docs, cfg, quality=True), docs):
        stripped = text.strip()
        if rule in ("empty", "too_short"):
            continue
        assert key == dedup_key(stripped)
        assert rule == quality_failure(stripped, cfg)
        if rule is None:
            ref = MinHash(num_perm=cfg.near_dedup_num_perm, seed=1, hashfunc=int)
            ref.update_batch(shingle_hashes(stripped, cfg.near_dedup_shingle, {}).tolist())
            assert np.array_equal(sig, ref.hashvalues)
            assert len(bands) == banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)[0]
        else:
            assert sig is None and bands is None


def test_repeated_ngram_shares_survive_hash_collisions(monkeypatch):
    import numpy as np

    from tinylm.data import clean

    docs = ["a b c a b c d", "x y z w x y z", "p q r s t u v"]
    folded = [d.split() for d in docs]
    lengths = [[len(w) for w in words] for words in folded]
    expected = [repeated_ngram_share(words, 3) for words in folded]
    assert clean.repeated_ngram_shares(folded, lengths, 3) == expected
    # Every n-gram hashing alike forces the exact fallback.
    monkeypatch.setattr(clean, "ngram_hashes", lambda ids, n: np.zeros(len(ids) - n + 1, dtype=np.uint64))
    assert clean.repeated_ngram_shares(folded, lengths, 3) == expected


def test_resolve_scans_keys_are_dedup_keys_of_kept_documents():
    from tinylm.data.clean import dedup_key, resolve_scans, scan_documents

    docs = ["Hello  World, this is a test document.", "hello world, THIS is a test document.",
            "\u00c9t\u00e9 \u2003 caf\u00e9 \u00df Stra\u00dfe and more words here", "  tabs\tand\nlines  everywhere here  ",
            "x", "Another distinct document with enough words."]
    cfg = CleanConfig(min_chars=0, min_words=0, near_dedup=False)
    keys: list = []
    kept, _ = resolve_scans(scan_documents(docs, cfg, quality=False), cfg, keys=keys)
    assert keys == [dedup_key(d) for d in kept]
    assert kept == clean_documents(docs, cfg, quality=False)[0]


def test_near_dedup_never_depends_on_band_hashes(monkeypatch):
    """Every band hash colliding must not make documents that share no band candidates of each other."""
    import numpy as np

    from tinylm.data import clean, minhash
    from tinylm.data.clean import resolve_scans, scan_documents

    cfg = CleanConfig(min_chars=0, min_words=0)
    base = " ".join(f"w{i}" for i in range(60))
    docs = [base, base + " extra words here", " ".join(f"v{i}" for i in range(60)), base.replace("w30", "x")]
    expected = resolve_scans(scan_documents(docs, cfg, quality=False), cfg)
    monkeypatch.setattr(clean, "band_hashes", lambda sigs, n_bands, rows: np.zeros((len(sigs), n_bands), np.uint64))
    assert resolve_scans(scan_documents(docs, cfg, quality=False), cfg) == expected
    # With every band in one bucket, only the exact band check keeps unrelated documents apart.
    sigs = [s[4] for s in scan_documents(docs, cfg, quality=False)]
    n_bands, rows = minhash.banding(cfg.near_dedup_threshold, cfg.near_dedup_num_perm)
    assert not minhash.shares_band(sigs[0], sigs[2], n_bands * rows, rows)


def test_symbol_count_matches_the_symbol_regex():
    import random

    from tinylm.data.clean import _SYMBOL, _symbol_count

    rng = random.Random(5)
    pieces = ["#", "##", ".", "..", "...", "....", "\u2026", "a", " ", "#.", ".#", "\n"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 30)))
        assert _symbol_count(text) == len(_SYMBOL.findall(text))
