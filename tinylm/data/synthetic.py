"""Built-in synthetic sources: seeded generators of verifiable reasoning problems and of plain prose.

Every generator draws `Problem`s. A problem belongs to the train or the test split according to a hash of its
prompt, never according to the draw, so the two splits cannot share a prompt whatever the seeds, sizes and
difficulties asked for (`check_disjoint` verifies it). Worked solutions end in a line `#### <answer>`, the
GSM8K convention, so one answer extractor serves every family.

Families in `PHRASED` also have an `unseen` split, drawn only from the phrasing parts held out of both other
splits (see `tinylm.data.word_problems`).

The evaluation harness calls `problems(family, split="test")`; sources call `documents(...)`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable

from tinylm.errors import UserError

VERSION = 3
"""Bumped whenever a generator's output changes, so prepared data made with the old one is rebuilt."""

TEST_PERCENT = 10
"""Share (in percent) of the prompt space that belongs to the test split."""

ANSWER_PREFIX = "#### "


@dataclass(frozen=True)
class Problem:
    """A prompt with a verifiable answer and the worked solution a model should learn to write."""

    prompt: str
    solution: str
    """Reasoning lines ending in `#### <answer>`."""
    answer: str
    family: str

    def text(self) -> str:
        """The plain-text (pretraining) form."""
        return f"{self.prompt}\n{self.solution}"

    def messages(self) -> list[dict[str, str]]:
        """The chat (SFT) form."""
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.solution}]


def split_of(family: str, prompt: str) -> str:
    digest = hashlib.blake2b(f"{family}\x00{prompt}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % 100 < TEST_PERCENT else "train"


def extract_answer(text: str) -> str | None:
    """The answer after the last `#### ` line of a completion (GSM8K style), or None if there is none."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("####"):
            return line[4:].strip().replace(",", "")
    return None


def _finish(lines: list[str], answer) -> str:
    return "\n".join(lines + [f"{ANSWER_PREFIX}{answer}"])


# Every worked operation goes column by column, so each step is a one-digit fact plus a carry or a borrow and
# a small model never has to produce a multi-digit result in one go. The columns run from the ones up for
# +, - and x (where the carry moves) and from the left for / (where the remainder moves).

def _digits(n: int) -> list[int]:
    return [int(c) for c in reversed(str(n))]


def _add_columns(a: int, b: int) -> list[str]:
    da, db, carry, cols = _digits(a), _digits(b), 0, []
    for i in range(max(len(da), len(db))):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        cols.append(f"{x} + {y}{' + 1' if carry else ''} = {total}")
        carry = total // 10
    return cols


def _sub_columns(a: int, b: int) -> list[str]:
    da, db, borrow, cols = _digits(a), _digits(b), 0, []
    for i, x in enumerate(da):
        y = db[i] if i < len(db) else 0
        value = x - y - borrow
        step = f"{x} - {y}{' - 1' if borrow else ''}"
        borrow = int(value < 0)
        cols.append(f"{step}{' + 10' if borrow else ''} = {value + 10 * borrow}")
    return cols


def _mul_columns(a: int, b: int) -> list[str]:
    carry, cols = 0, []
    for x in _digits(a):
        product = x * b + carry
        cols.append(f"{x} x {b}{f' + {carry}' if carry else ''} = {product}")
        carry = product // 10
    return cols


def _div_columns(a: int, b: int) -> list[str]:
    rest, cols = 0, []
    for x in str(a):
        current = rest * 10 + int(x)
        quotient, rest = divmod(current, b)
        if cols or quotient:
            cols.append(f"{current} / {b} = {quotient}{f' r {rest}' if rest else ''}")
    return cols


_COLUMNS = {"+": (_add_columns, lambda a, b: a + b), "-": (_sub_columns, lambda a, b: a - b),
            "x": (_mul_columns, lambda a, b: a * b), "/": (_div_columns, lambda a, b: a // b)}


def worked(a: int, op: str, b: int) -> str:
    """`a op b` worked out, e.g. "67 + 78: 7 + 8 = 15, 6 + 7 + 1 = 14, so 145"; one-column sums stay plain.

    `x` and `/` take a one-digit `b`; `/` expects `b` to divide `a`.
    """
    columns, result = _COLUMNS[op]
    cols = columns(a, b)
    if len(cols) == 1:
        return f"{a} {op} {b} = {result(a, b)}"
    return f"{a} {op} {b}: {', '.join(cols)}, so {result(a, b)}"


# --- arithmetic -------------------------------------------------------------------------------------------

def _digits_for(difficulty: int) -> int:
    return 1 + max(1, min(difficulty, 5))


def arithmetic(rng: random.Random, difficulty: int) -> Problem:
    digits = _digits_for(difficulty)
    op = rng.choice("+-*")
    a = rng.randrange(10 ** (digits - 1), 10**digits)
    if op == "*":
        b = rng.randrange(2, 10 ** max(1, digits // 2))
        lines, partials = [], []
        for place, d in enumerate(_digits(b)):
            if d == 0:
                continue
            part = a * d * 10**place
            partials.append(part)
            lines.append(f"{worked(a, 'x', d)}." + (f" Then {a * d} x {10**place} = {part}." if place else ""))
        total = partials[0]
        for part in partials[1:]:
            lines.append(f"Add the parts: {worked(total, '+', part)}.")
            total += part
        return Problem(f"What is {a} x {b}?", _finish(lines, a * b), str(a * b), "arithmetic")
    b = rng.randrange(10 ** (digits - 1), 10**digits)
    if op == "-":
        a, b = max(a, b), min(a, b)
    answer = _COLUMNS[op][1](a, b)
    return Problem(f"What is {a} {op} {b}?", _finish([f"{worked(a, op, b)}."], answer), str(answer), "arithmetic")


# --- counting ---------------------------------------------------------------------------------------------

_SYLLABLES = ["ba", "ko", "ri", "ne", "lu", "ma", "te", "so", "pi", "da", "ve", "ga", "lo", "nu", "re", "ta", "mi",
              "sa", "fo", "ke", "bri", "sto", "pla", "tre", "an", "el", "or", "us", "is"]


def _pseudo_word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(syllables))


def counting(rng: random.Random, difficulty: int) -> Problem:
    word = _pseudo_word(rng, 2 + difficulty + rng.randrange(2))
    letter = rng.choice(sorted(set(word)))
    positions = [i + 1 for i, c in enumerate(word) if c == letter]
    spelled = "-".join(word)
    pos = ", ".join(map(str, positions))
    lines = [f"Spell it out: {spelled}.", f"The letter {letter} is at position{'s' if len(positions) > 1 else ''} {pos}.",
             f"That is {len(positions)} time{'s' if len(positions) > 1 else ''}."]
    prompt = f'How many times does the letter "{letter}" appear in the word "{word}"?'
    return Problem(prompt, _finish(lines, len(positions)), str(len(positions)), "counting")


# --- comparison -------------------------------------------------------------------------------------------

def _decimal(rng: random.Random, int_digits: int, frac_digits: int) -> str:
    whole = rng.randrange(0, 10**int_digits)
    frac = "".join(str(rng.randrange(10)) for _ in range(frac_digits)).rstrip("0") or "0"
    return f"{whole}.{frac}"


def comparison(rng: random.Random, difficulty: int) -> Problem:
    int_digits = max(1, difficulty // 2)
    a = _decimal(rng, int_digits, rng.randint(1, 1 + difficulty))
    if rng.random() < 0.6:
        # Same whole part and a different number of decimals is the case that trips models up.
        whole = a.split(".")[0]
        b = f"{whole}.{_decimal(rng, 1, rng.randint(1, 1 + difficulty)).split('.')[1]}"
    else:
        b = _decimal(rng, int_digits, rng.randint(1, 1 + difficulty))
    if a == b or float(a) == float(b):
        b = f"{int(a.split('.')[0]) + 1}.{a.split('.')[1]}"
    wa, fa = a.split(".")
    wb, fb = b.split(".")
    width = max(len(fa), len(fb))
    lines = [f"Compare the whole parts: {wa} and {wb}."]
    if int(wa) != int(wb):
        bigger = a if int(wa) > int(wb) else b
        lines.append(f"{max(int(wa), int(wb))} is larger, so {bigger} is larger.")
    else:
        pa, pb = fa.ljust(width, "0"), fb.ljust(width, "0")
        lines.append(f"They are equal, so compare the decimals with the same number of places: {pa} and {pb}.")
        bigger = a if int(pa) > int(pb) else b
        lines.append(f"{max(pa, pb, key=int)} is larger, so {bigger} is larger.")
    prompt = f"Which number is larger: {a} or {b}?"
    return Problem(prompt, _finish(lines, bigger), bigger, "comparison")


# --- sorting ----------------------------------------------------------------------------------------------

def sorting(rng: random.Random, difficulty: int) -> Problem:
    count = 3 + difficulty
    top = 10 ** (1 + (difficulty + 1) // 2)
    values = rng.sample(range(top), count)
    descending = rng.random() < 0.3
    order = "largest to smallest" if descending else "smallest to largest"
    remaining, chosen, lines = list(values), [], []
    while len(remaining) > 1:
        pick = max(remaining) if descending else min(remaining)
        word = "largest" if descending else "smallest"
        lines.append(f"The {word} of {', '.join(map(str, remaining))} is {pick}.")
        chosen.append(pick)
        remaining.remove(pick)
    chosen.extend(remaining)
    answer = ", ".join(map(str, chosen))
    lines.append(f"The last one left is {remaining[0]}.")
    prompt = f"Sort these numbers from {order}: {', '.join(map(str, values))}."
    return Problem(prompt, _finish(lines, answer), answer, "sorting")


# --- unit conversion --------------------------------------------------------------------------------------

_UNIT_CHAINS = [
    [("kilometers", 1), ("meters", 1000), ("centimeters", 100), ("millimeters", 10)],
    [("kilograms", 1), ("grams", 1000), ("milligrams", 1000)],
    [("weeks", 1), ("days", 7), ("hours", 24), ("minutes", 60), ("seconds", 60)],
    [("liters", 1), ("milliliters", 1000)],
    [("yards", 1), ("feet", 3), ("inches", 12)],
]


def units(rng: random.Random, difficulty: int) -> Problem:
    chain = rng.choice(_UNIT_CHAINS)
    hops = min(len(chain) - 1, 1 + rng.randrange(max(1, min(difficulty, len(chain) - 1))))
    start = rng.randrange(0, len(chain) - hops)
    amount = rng.randint(2, 10 ** (2 + difficulty // 2))
    value, lines = amount, []
    for i in range(start, start + hops):
        (src, _), (dst, factor) = chain[i], chain[i + 1]
        lines.append(f"1 {src[:-1]} is {factor} {dst}, so {value} {src} is {value} x {factor} = {value * factor} {dst}.")
        value *= factor
    src_name, dst_name = chain[start][0], chain[start + hops][0]
    prompt = f"How many {dst_name} are in {amount} {src_name}?"
    return Problem(prompt, _finish(lines, value), str(value), "units")


# --- registry ---------------------------------------------------------------------------------------------

Generator = Callable[[random.Random, int], Problem]
FAMILIES: dict[str, Generator] = {
    "arithmetic": arithmetic,
    "counting": counting,
    "comparison": comparison,
    "sorting": sorting,
    "units": units,
}


PHRASED: set[str] = set()
"""Families whose generators take `held_out=True` and so have an `unseen` split."""

SPLITS = ("train", "test", "unseen")


def _register_text_families() -> None:
    from tinylm.data import synthetic_text, word_problems

    FAMILIES.update(synthetic_text.FAMILIES)
    FAMILIES["word_problems"] = word_problems.word_problems
    PHRASED.add("word_problems")


_register_text_families()

def generate(family: str, split: str = "train", n: int = 100, seed: int = 0, difficulty: int = 2) -> list[Problem]:
    """`n` distinct problems of `family` from `split`, the same for the same arguments.

    Stops early (returning fewer) only if the family's prompt space at this difficulty is nearly exhausted.
    """
    if family not in FAMILIES:
        raise KeyError(family)
    unseen = split == "unseen" or split.startswith("unseen-")
    if split not in SPLITS and not unseen or (unseen and family not in PHRASED):
        splits = SPLITS + ("unseen-GROUP",) if family in PHRASED else SPLITS[:2]
        raise UserError(f"{family}: split must be one of {', '.join(splits)}, got {split!r}")
    make = FAMILIES[family]
    if unseen:
        from tinylm.data.word_problems import check_capacity, held_groups

        # `unseen-GROUP` holds out one group of wording alone (`tinylm.data.word_problems.GROUPS`).
        held = True if split == "unseen" else split.removeprefix("unseen-")
        held_groups(held)
        check_capacity(n, difficulty)
        make = lambda rng, difficulty: FAMILIES[family](rng, difficulty, held_out=held)  # noqa: E731
    rng = random.Random(f"tinylm/{family}/{split}/{seed}/{difficulty}")
    seen: set[str] = set()
    out: list[Problem] = []
    misses = 0
    while len(out) < n and misses < 200 + 50 * n:
        p = make(rng, difficulty)
        # The held-out parts alone keep unseen prompts apart from the others; the hash splits the rest.
        if p.prompt in seen or (not unseen and split_of(family, p.prompt) != split):
            misses += 1
            continue
        seen.add(p.prompt)
        out.append(p)
    if unseen and len(out) < n:
        raise UserError(f"{family}: the held-out phrasing parts made only {len(out)} distinct problems of the "
                        f"{n} asked for")
    return out


def problems(family: str, n: int = 100, seed: int = 0, difficulty: int = 2, split: str = "test") -> list[Problem]:
    """Held-out problems for evaluation: prompt, worked solution and the answer to compare with."""
    return generate(family, split, n, seed, difficulty)


def documents(family: str, split: str = "train", n: int = 100, seed: int = 0, difficulty: int = 2,
              chat: bool = False) -> list:
    """Documents of a synthetic source: plain strings, or chat `messages` lists when `chat`."""
    items = generate(family, split, n, seed, difficulty)
    if chat:
        return [p.messages() for p in items]
    return [p.text() for p in items]


def check_disjoint(family: str, n: int = 500, seed: int = 0, difficulty: int = 2) -> None:
    """Raise AssertionError if any prompt occurs in both splits (a guard against a broken split function)."""
    train = {p.prompt for p in generate(family, "train", n, seed, difficulty)}
    test = {p.prompt for p in generate(family, "test", n, seed + 1, difficulty)}
    common = train & test
    if common:
        raise AssertionError(f"{family}: {len(common)} prompts in both splits, e.g. {next(iter(common))!r}")


def default_sources():
    """The embedded default mixture: prose plus every reasoning family, sized for a CPU quickstart."""
    from tinylm.data.config import SourceConfig

    sizes = {"stories": 6000, "word_problems": 3000, "arithmetic": 3000, "counting": 1000,
             "comparison": 1000, "sorting": 1000, "units": 1000}
    return [SourceConfig(name=f, type="synthetic", generator=f, num_docs=n) for f, n in sizes.items()]
