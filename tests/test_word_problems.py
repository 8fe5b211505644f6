import re
import string

import pytest

from tinylm.data import synthetic, word_problems
from tinylm.errors import UserError


def _text(part) -> str:
    return part[0] if isinstance(part, tuple) else part


def _marker(part) -> re.Pattern:
    """The part's whole template as a pattern, each field any words within one line."""
    pieces = [re.escape(lit) + ("[^\\n]+?" if field is not None else "")
              for lit, field, *_ in string.Formatter().parse(_text(part))]
    return re.compile("".join(pieces))


def _all_parts(held_out: bool):
    for kind, parts in word_problems.KINDS.items():
        for part in parts.pool(held_out):
            yield kind, _marker(part)


@pytest.fixture(scope="module")
def training_text():
    docs = synthetic.documents("word_problems", "train", 3000, seed=0) + \
        synthetic.documents("word_problems", "test", 300, seed=0)
    return "\n".join(docs)


def test_no_held_out_part_occurs_in_any_training_document(training_text):
    for kind, marker in _all_parts(held_out=True):
        assert not marker.search(training_text), (kind, marker.pattern)


def test_every_seen_part_occurs_in_training_so_the_check_above_can_fail(training_text):
    missing = [(kind, m) for kind, m in _all_parts(held_out=False) if not m.search(training_text)]
    assert not missing


def test_unseen_problems_draw_held_out_parts_only():
    seen_names = {n for n, _ in word_problems.NAMES.seen}
    for p in synthetic.problems("word_problems", n=200, split="unseen"):
        assert any(m.search(p.prompt) for _, m in _all_parts(held_out=True)), p.prompt
        assert not seen_names & set(re.findall(r"[A-Z][a-z]+", p.prompt)), p.prompt


def test_unseen_problems_take_two_or_more_column_worked_operations_on_operands_from_2_to_99():
    for p in synthetic.problems("word_problems", n=300, split="unseen"):
        ops = [line for line in p.solution.splitlines()[:-1] if re.search(r"\d+ [-+x/] \d+", line)]
        assert len(ops) >= 2, p.solution
        assert all(2 <= int(n) <= 99 for n in re.findall(r"\d+", p.prompt)), p.prompt
        assert p.solution.splitlines()[-1] == f"#### {p.answer}"


def test_the_generator_covers_money_rates_comparisons_connectors_and_distractors():
    prompts = " ".join(p.prompt for p in synthetic.generate("word_problems", "train", 400, seed=2))
    for needle in ("$", " each", " an hour", " more ", " times as many ", " and then ", "years old",
                   "How much money"):
        assert needle in prompts, needle
    assert re.search(r"\. (She|He) ", prompts)  # pronouns after the first mention


def test_more_unseen_problems_than_the_held_out_parts_can_make_is_refused():
    limit = word_problems.capacity(2)
    with pytest.raises(UserError, match="held-out parts can make at most"):
        synthetic.generate("word_problems", "unseen", limit + 1)


def test_families_without_held_out_phrasings_have_no_unseen_split():
    with pytest.raises(UserError, match="split must be one of train, test"):
        synthetic.generate("arithmetic", "unseen", 5)


def test_each_group_split_holds_out_its_own_group_and_no_other():
    # The breakdown of unseen accuracy by group is only honest if an `unseen-GROUP` problem carries a held-out
    # part of that group in every prompt and none of any other group's.
    for group in word_problems.GROUPS:
        own = [_marker(p) for parts in word_problems.KINDS.values() if parts.group == group for p in parts.held_out]
        other = [_marker(p) for parts in word_problems.KINDS.values() if parts.group != group
                 for p in parts.held_out]
        for p in synthetic.problems("word_problems", n=40, split=f"unseen-{group}"):
            assert any(m.search(p.prompt) for m in own), (group, p.prompt)
            assert not any(m.search(p.prompt) for m in other), (group, p.prompt)


def test_an_unknown_group_is_refused_with_one_line():
    with pytest.raises(UserError, match="no held-out group 'adverbs'"):
        synthetic.problems("word_problems", n=5, split="unseen-adverbs")
