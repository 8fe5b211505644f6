"""Token overlap between pretraining text and a task, the quantity the Tiny Language Models paper relates the
benefit of pretraining to.

The paper does not say how it measures overlap. Here it is the share of the task's n-gram occurrences that also
occur somewhere in the pretraining text, counted over lower-cased words by default: under a BPE trained on the
pretraining text itself, nearly every token of any task occurs in that text, so token unigrams would read close
to 1 whatever the task. A tokenizer can be passed to count its token n-grams instead.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

WORD = re.compile(r"\w+(?:'\w+)?")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(units: list, n: int) -> Iterable[tuple]:
    return zip(*(units[i:] for i in range(n)))


def token_overlap(task_texts: Iterable[str], docs: Iterable[str], n: int = 1,
                  tokenize: Callable[[str], list] | None = None) -> float:
    """Share (0 to 1) of the n-gram occurrences of `task_texts` that occur in `docs`; 0 for a task without any.

    `tokenize` turns a text into units (default: lower-cased words); `lambda t: tok.encode(t).ids` counts a
    tokenizer's tokens. N-grams do not cross from one text or document to the next.
    """
    if n < 1:
        raise ValueError(f"token_overlap: n must be 1 or more, got {n}")
    split = tokenize or words
    seen = set()
    for doc in docs:
        seen.update(ngrams(split(doc), n))
    found = total = 0
    for text in task_texts:
        for gram in ngrams(split(text), n):
            total += 1
            found += gram in seen
    return found / total if total else 0.0
