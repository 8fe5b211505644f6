import pytest

from tinylm.data import synthetic
from tinylm.data.synthetic import Problem, extract_answer


@pytest.mark.parametrize("family", sorted(synthetic.FAMILIES))
def test_families_are_deterministic_disjoint_and_verifiable(family):
    first = synthetic.generate(family, "train", 200, seed=3, difficulty=2)
    again = synthetic.generate(family, "train", 200, seed=3, difficulty=2)
    assert first == again
    assert len({p.prompt for p in first}) == len(first) == 200
    test = synthetic.problems(family, n=100, seed=3)
    assert not {p.prompt for p in first} & {p.prompt for p in test}
    synthetic.check_disjoint(family, n=300, seed=5, difficulty=3)
    for p in first[:50] + test[:50]:
        assert isinstance(p, Problem) and p.family == family
        assert extract_answer(p.solution) == p.answer.replace(",", "")
        assert p.text().startswith(p.prompt)


def test_other_seed_gives_other_problems():
    a = {p.prompt for p in synthetic.generate("arithmetic", "train", 100, seed=0)}
    b = {p.prompt for p in synthetic.generate("arithmetic", "train", 100, seed=1)}
    assert a != b


def test_arithmetic_answers_are_correct():
    for p in synthetic.generate("arithmetic", "train", 300, difficulty=4):
        expr = p.prompt.removeprefix("What is ").rstrip("?").replace(" x ", " * ")
        assert eval(expr) == int(p.answer)  # the prompt is only digits and one operator


def test_word_problems_follow_gsm8k_format_and_scale_with_difficulty():
    easy = synthetic.generate("word_problems", "train", 100, difficulty=1)
    hard = synthetic.generate("word_problems", "train", 100, difficulty=5)
    for p in easy + hard:
        lines = p.solution.splitlines()
        assert lines[-1] == f"#### {p.answer}"
        assert p.prompt.endswith("?")
    mean_steps = lambda ps: sum(len(p.solution.splitlines()) for p in ps) / len(ps)
    assert mean_steps(hard) > mean_steps(easy) + 1


def test_chat_and_text_forms():
    docs = synthetic.documents("sorting", n=5)
    chats = synthetic.documents("sorting", n=5, chat=True)
    assert all(isinstance(d, str) and "#### " in d for d in docs)
    for messages in chats:
        assert [m["role"] for m in messages] == ["user", "assistant"]
        assert messages[1]["content"].splitlines()[-1].startswith("#### ")


def test_extract_answer():
    assert extract_answer("so 3 + 4 = 7\n#### 1,234") == "1234"
    assert extract_answer("no answer here") is None


def test_stories_are_prose():
    text = synthetic.documents("stories", n=1)[0]
    assert len(text.split()) > 40 and "Question:" in text


def test_unknown_family():
    with pytest.raises(KeyError):
        synthetic.generate("nope")


def test_worked_operations_are_right_column_by_column():
    import random
    import re

    rng = random.Random(0)
    for _ in range(2000):
        a, b = rng.randint(2, 999), rng.randint(2, 999)
        for op, x, y in (("+", a, b), ("-", max(a, b), min(a, b)), ("x", a, b % 8 + 2), ("/", a * (b % 8 + 2), b % 8 + 2)):
            text = synthetic.worked(x, op, y)
            expected = {"+": x + y, "-": x - y, "x": x * y, "/": x // y}[op]
            assert int(re.split(r"(?:so|=) ", text)[-1]) == expected, text
            for step in text.split(": ", 1)[-1].split(", so")[0].split(", "):  # every column's own arithmetic
                left, right = step.split(" = ")
                if " r " in right:
                    q, r = map(int, right.split(" r "))
                    n, d = map(int, left.split(" / "))
                    assert (q, r) == divmod(n, d), text
                else:
                    assert eval(left.replace("x", "*").replace("/", "//")) == int(right), text


def test_word_problems_at_the_default_difficulty_take_two_or_more_operations_on_operands_from_2_to_99():
    import re

    for p in synthetic.problems("word_problems", n=300):
        operations = [line for line in p.solution.splitlines()[:-1] if re.search(r"\d+ [-+x/] \d+", line)]
        assert len(operations) >= 2, p.solution
        numbers = [int(n) for n in re.findall(r"\d+", p.prompt)]
        assert numbers and all(2 <= n <= 99 for n in numbers), p.prompt
