"""GSM8K-style word problems composed from parts, with whole phrasings held out of training.

A problem is built from parts of several kinds: an opening sentence form, verbs for each operation, sentence
forms for one action, connectors that put two actions in one sentence, distractor sentences, question forms,
names and objects. Every kind is a pair of pools, `seen` and `held_out`. The training and `test` splits draw
only seen parts (and are told apart by the prompt hash, as every family is); the `unseen` split draws only
held-out parts, so a score on it measures reading wording the model never saw, not recall of the
generator's sentences. Operands stay between 2 and 99 and every operation is worked column by column.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from tinylm.data.synthetic import Problem, _finish, worked
from tinylm.errors import UserError


@dataclass(frozen=True)
class Parts:
    seen: tuple
    held_out: tuple
    group: str
    """The kind of wording the parts are (one of `GROUPS`): a split may hold out one group alone."""

    def pool(self, held_out: bool) -> tuple:
        return self.held_out if held_out else self.seen


GROUPS = ("names", "objects", "verbs", "sentences", "connectors", "questions", "distractors")
"""The kinds of wording held out one at a time by the `unseen-<group>` splits, to find which one fails."""


# Names carry their pronoun so later mentions can use it. The seen pools are broad on purpose: with many
# names, objects, verbs and forms for each role, the model learns to read a role from its cues (a number after
# a verb, "more", "each", the question's last words) instead of recalling a few sentences.
NAMES = Parts(
    seen=(("Mia", "she"), ("Leo", "he"), ("Ava", "she"), ("Noah", "he"), ("Zara", "she"), ("Omar", "he"),
          ("Lena", "she"), ("Ravi", "he"), ("Ines", "she"), ("Kofi", "he"), ("Yuki", "she"), ("Tomas", "he"),
          ("Priya", "she"), ("Jonah", "he"), ("Hana", "she"), ("Diego", "he"), ("Amara", "she"), ("Felix", "he"),
          ("Nora", "she"), ("Sami", "he"), ("Elif", "she"), ("Mateo", "he"), ("Chloe", "she"), ("Arjun", "he"),
          ("Freya", "she"), ("Hugo", "he"), ("Maya", "she"), ("Ezra", "he"), ("Lucia", "she"), ("Ivan", "he"),
          ("Grace", "she"), ("Kenji", "he"), ("Sofia", "she"), ("Malik", "he"), ("Tara", "she"), ("Owen", "he")),
    held_out=(("Beatrix", "she"), ("Quentin", "he"), ("Odette", "she"), ("Wendell", "he"), ("Rosalind", "she"),
              ("Cyrus", "he")),
    group="names")
OBJECTS = Parts(
    seen=("apples", "marbles", "stickers", "books", "cookies", "pencils", "coins", "cards", "stamps", "beads",
          "oranges", "crayons", "buttons", "seeds", "ribbons", "shells", "grapes", "toys", "bottles", "peaches",
          "blocks", "balloons", "cupcakes", "rocks", "socks", "plums", "paperclips", "puzzles", "berries", "eggs"),
    held_out=("pebbles", "acorns", "feathers", "lemons", "walnuts", "magnets"),
    group="objects")
GOODS = Parts(seen=("pens", "notebooks", "sandwiches", "tickets", "plants", "kites", "hats", "mugs", "scarves",
                    "posters", "pies", "games"),
              held_out=("candles", "teacups", "lanterns"), group="objects")
FRIENDS = Parts(seen=("a friend", "a cousin", "a neighbor", "a teacher", "a brother",
                      "a sister", "a coach", "grandpa"),
                held_out=("an aunt", "a classmate"), group="names")

# Subjectless verb phrases, third person singular. {n}: the operand, {o}: the object, {f}: another person.
ADD = Parts(seen=("buys {n} more {o}", "finds {n} {o}", "gets {n} {o} from {f}", "receives {n} {o}",
                  "gets {n} more {o}", "earns {n} {o}", "adds {n} {o}", "makes {n} more {o}", "wins {n} {o}",
                  "gathers {n} {o}", "borrows {n} {o} from {f}", "is handed {n} {o} by {f}"),
            held_out=("is given {n} {o}", "picks up {n} extra {o}"), group="verbs")
SUB = Parts(seen=("gives away {n} {o}", "loses {n} {o}", "sells {n} {o}", "gives {n} {o} to {f}",
                  "eats {n} {o}", "throws away {n} {o}", "breaks {n} {o}", "lends {n} {o} to {f}",
                  "trades away {n} {o}", "hands {n} {o} to {f}", "misplaces {n} {o}"),
            held_out=("uses up {n} {o}", "drops {n} of the {o}"), group="verbs")
# (phrase, factor or None for a drawn factor {k})
MUL = Parts(seen=(("doubles the number of {o}", 2), ("ends up with {k} times as many {o}", None),
                  ("doubles the {o}", 2), ("gets {k} times as many {o} as before", None),
                  ("multiplies the {o} by {k}", None)),
            held_out=(("triples the number of {o}", 3), ("makes the pile of {o} {k} times bigger", None)),
            group="verbs")
DIV = Parts(seen=(("gives away half of the {o}", 2), ("puts the {o} into {k} equal groups and keeps one group", None),
                  ("loses half of the {o}", 2), ("shares the {o} equally among {k} people and keeps one share", None),
                  ("sells half of the {o}", 2), ("divides the {o} into {k} equal bags and keeps one bag", None)),
            held_out=(("keeps only half of the {o}", 2),
                      ("splits the {o} into {k} equal piles and keeps one pile", None)),
            group="verbs")
# Rates on objects: {k} containers of {n} each, added.
PACKS = Parts(seen=("buys {k} boxes of {o} with {n} {o} in each box", "gets {k} packs of {n} {o} each",
                    "finds {k} baskets with {n} {o} in each basket", "receives {k} boxes of {n} {o}"),
              held_out=("gets {k} bags holding {n} {o} per bag",), group="verbs")
EARN = Parts(seen=("earns ${n}", "gets ${n} from {f}", "is paid {n} dollars", "makes ${n}", "finds ${n}",
                   "receives {n} dollars from {f}", "gets {n} more dollars", "saves ${n} more"),
             held_out=("wins ${n} in a contest", "collects {n} dollars in tips"), group="verbs")
SPEND = Parts(seen=("spends ${n}", "pays ${n} for lunch", "gives {n} dollars to {f}", "loses ${n}",
                    "spends {n} dollars on a book", "pays {n} dollars for a ticket", "lends ${n} to {f}",
                    "gives away ${n}"),
              held_out=("loses ${n} on the way home", "donates {n} dollars to charity"), group="verbs")
# Money rates: {k} things at ${n} each (spent), or ${n} an hour for {k} hours (earned).
BUY_EACH = Parts(seen=("buys {k} {g} at ${n} each", "buys {k} {g} for ${n} each", "pays for {k} {g} at {n} dollars each"),
                 held_out=("orders {k} {g} that cost ${n} apiece",), group="verbs")
WAGE = Parts(seen=("works {k} hours at ${n} an hour", "earns ${n} an hour for {k} hours",
                   "babysits for {k} hours at {n} dollars an hour"),
             held_out=("is paid ${n} per hour for {k} hours of work",), group="verbs")

OPENINGS = Parts(seen=("{N} has {n} {o}.", "{N} starts with {n} {o}.", "{N} had {n} {o}.",
                       "{N} has a box of {n} {o}.", "There are {n} {o} in {N}'s bag.", "{N} begins the day with {n} {o}."),
                 held_out=("At first, {N} owns {n} {o}.", "{N} keeps {n} {o} in a jar."), group="sentences")
MONEY_OPENINGS = Parts(seen=("{N} has ${n}.", "{N} has {n} dollars in a piggy bank.", "{N} starts with ${n}.",
                             "{N} has {n} dollars.", "{N} begins the week with ${n}."),
                       held_out=("{N} saved up ${n}.", "There is ${n} in {N}'s wallet."), group="sentences")
# One action: {S} the subject capitalised, {s} as it is; {a} the verb phrase.
SENTENCES = Parts(seen=("{S} {a}.", "Then {s} {a}.", "Later, {s} {a}.", "Next, {s} {a}.", "The next day {s} {a}.",
                        "In the morning, {s} {a}.", "After school, {s} {a}.", "Soon {s} {a}."),
                  held_out=("After that, {s} {a}.", "In the afternoon, {s} {a}."), group="sentences")
CONNECTORS = Parts(seen=("{S} {a} and then {b}.", "{S} {a}, and later {s} {b}.", "{S} {a}, then {b}.",
                         "{S} {a} and {b}.", "{S} {a}, and the next day {s} {b}.", "{S} {a} before {s} {b}."),
                   held_out=("{S} {a} and after lunch {b}.", "First {s} {a}; next, {s} {b}."), group="connectors")
QUESTIONS = Parts(seen=("How many {o} does {N} have now?", "How many {o} does {N} have at the end?",
                        "How many {o} does {N} have left?", "How many {o} does {N} end up with?",
                        "How many {o} does {N} have in all now?", "Now how many {o} does {N} have?"),
                  held_out=("How many {o} are left with {N}?", "In the end, what number of {o} does {N} hold?"),
                  group="questions")
MONEY_QUESTIONS = Parts(seen=("How much money does {N} have now?", "How many dollars does {N} have at the end?",
                              "How much money does {N} have left?", "How many dollars does {N} end up with?"),
                        held_out=("How much money is left with {N}?", "In the end, what sum in dollars does {N} hold?"),
                        group="questions")
DISTRACTORS = Parts(seen=("{N}'s brother is {d} years old.", "The shop is {d} minutes away.",
                          "{N} lives at number {d}.", "The school has {d} classrooms.", "{N}'s dog is {d} months old.",
                          "The park is {d} blocks from home."),
                    held_out=("It is {d} degrees outside.", "The bus ride takes {d} stops."), group="distractors")
# Two people. {B} compared with {A}; the question asks for both together.
COMPARE_MORE = Parts(seen=("{B} has {n} more {o} than {A}.", "{B} has {n} {o} more than {A} does."),
                     held_out=("{B} owns {n} {o} beyond what {A} has.",), group="sentences")
COMPARE_TIMES = Parts(seen=("{B} has {k} times as many {o} as {A}.", "{B} has {k} times the number of {o} {A} has."),
                      held_out=("{B} holds {k} times the {o} that {A} holds.",), group="sentences")
TOTALS = Parts(seen=("How many {o} do {A} and {B} have in total?", "How many {o} do they have together?",
                     "How many {o} do {A} and {B} have altogether?", "How many {o} do the two have in all?"),
               held_out=("Counting both children, how many {o} are there?", "What is the sum of their {o}?"),
               group="questions")

KINDS = {name: value for name, value in globals().items() if isinstance(value, Parts)}
"""Every part kind by name (the held-out test walks all of them)."""


def _divisors(have: int) -> list[int]:
    return [d for d in range(2, 10) if have % d == 0 and have // d >= 2]


class _Draw:
    """One problem being composed: the groups whose held-out parts it draws (`held`), the running solution,
    and whether a held-out part was used."""

    def __init__(self, rng: random.Random, held: frozenset):
        self.rng, self.held = rng, held
        # A split holding out one optional group (connectors, distractors) puts one in every problem.
        self.alone = next(iter(held)) if len(held) == 1 else ""
        (self.name, self.pronoun), = rng.sample(self.pool(NAMES), 1)
        self.used = NAMES.group in held  # the name is in every problem
        self.friend = rng.choice(self.pool(FRIENDS))
        self.lines: list[str] = []
        self.mentioned = False

    def pool(self, parts: Parts) -> tuple:
        return parts.pool(parts.group in self.held)

    def pick(self, parts: Parts):
        self.used |= parts.group in self.held
        return self.rng.choice(self.pool(parts))

    def subject(self) -> str:
        # The name on first mention, then mostly the pronoun, as people write.
        if self.mentioned and self.rng.random() < 0.7:
            return self.pronoun
        self.mentioned = True
        return self.name

    def apply(self, have: int, op: str, b: int) -> int:
        self.lines.append(f"{worked(have, op, b)}.")
        return {"+": have + b, "-": have - b, "x": have * b, "/": have // b}[op]


def _object_action(d: _Draw, have: int, obj: str) -> tuple[str, int]:
    """A verb phrase changing a count of objects, and the new count."""
    rng, choices = d.rng, ["add", "pack"]
    if have >= 4:
        choices.append("sub")
    if have <= 49:
        choices.append("mul")
    if _divisors(have):
        choices.append("div")
    kind = rng.choice(choices)
    if kind == "add":
        b = rng.randint(2, 99)
        return d.pick(ADD).format(n=b, o=obj, f=d.friend), d.apply(have, "+", b)
    if kind == "sub":
        b = rng.randint(2, min(99, have - 2))
        return d.pick(SUB).format(n=b, o=obj, f=d.friend), d.apply(have, "-", b)
    if kind == "pack":
        k, n = rng.randint(2, 9), rng.randint(2, 12)
        d.lines.append(f"{k} packs of {n} make {worked(n, 'x', k)} {obj}.")
        return d.pick(PACKS).format(k=k, n=n, o=obj), d.apply(have, "+", n * k)
    phrase, factor = d.pick(MUL if kind == "mul" else DIV)
    if kind == "mul":
        k = factor or rng.randint(2, 5)
        return phrase.format(k=k, o=obj), d.apply(have, "x", k)
    ks = [x for x in _divisors(have) if factor in (None, x)]
    if not ks:  # half of an odd count: add instead
        b = rng.randint(2, 99)
        return d.pick(ADD).format(n=b, o=obj, f=d.friend), d.apply(have, "+", b)
    k = rng.choice(ks)
    return phrase.format(k=k, o=obj), d.apply(have, "/", k)


def _money_action(d: _Draw, have: int, _obj: str) -> tuple[str, int]:
    rng = d.rng
    choices = ["earn", "wage"] + (["spend"] if have >= 4 else []) + (["buy"] if have >= 8 else [])
    kind = rng.choice(choices)
    if kind == "earn":
        b = rng.randint(2, 99)
        return d.pick(EARN).format(n=b, f=d.friend), d.apply(have, "+", b)
    if kind == "spend":
        b = rng.randint(2, min(99, have - 2))
        return d.pick(SPEND).format(n=b, f=d.friend), d.apply(have, "-", b)
    if kind == "wage":
        k, n = rng.randint(2, 9), rng.randint(2, 20)
        d.lines.append(f"{k} hours at {n} dollars make {worked(n, 'x', k)} dollars.")
        return d.pick(WAGE).format(k=k, n=n), d.apply(have, "+", n * k)
    k = rng.randint(2, 9)
    n = rng.randint(2, max(2, min(20, (have - 2) // k)))
    if n * k > have - 2:
        k, n = 2, 2
    goods = d.pick(GOODS)
    d.lines.append(f"{k} {goods} at {n} dollars cost {worked(n, 'x', k)} dollars.")
    return d.pick(BUY_EACH).format(k=k, n=n, g=goods), d.apply(have, "-", n * k)


def _distract(d: _Draw, story: list[str]) -> None:
    if d.rng.random() < 0.3 or d.alone == "distractors":
        sentence = d.pick(DISTRACTORS).format(N=d.name, d=d.rng.randint(2, 99))
        story.insert(d.rng.randint(1, len(story)), sentence)


def _actions(d: _Draw, have: int, steps: int, act, obj: str) -> tuple[list[str], int]:
    """`steps` actions as sentences, two of them sometimes joined by a connector in one sentence."""
    story, left = [], steps
    while left:
        if left >= 2 and (d.rng.random() < 0.4 or d.alone == "connectors" and left == steps):
            a, have = act(d, have, obj)
            b, have = act(d, have, obj)
            s = d.subject()
            story.append(d.pick(CONNECTORS).format(S=s[0].upper() + s[1:], s=d.pronoun, a=a, b=b))
            left -= 2
        else:
            a, have = act(d, have, obj)
            s = d.subject()
            story.append(d.pick(SENTENCES).format(S=s[0].upper() + s[1:], s=s, a=a))
            left -= 1
    return story, have


def _single(d: _Draw, steps: int, money: bool) -> Problem:
    obj = "" if money else d.pick(OBJECTS)
    have = d.rng.randint(2, 99)
    d.mentioned = True
    opening = d.pick(MONEY_OPENINGS if money else OPENINGS).format(N=d.name, n=have, o=obj)
    story, have = _actions(d, have, steps, _money_action if money else _object_action, obj)
    story = [opening] + story
    _distract(d, story)
    question = d.pick(MONEY_QUESTIONS if money else QUESTIONS).format(N=d.name, o=obj)
    return Problem(" ".join(story + [question]), _finish(d.lines, have), str(have), "word_problems")


def _compare(d: _Draw) -> Problem:
    """Two people: the second compared with the first (one operation), then both together (another)."""
    obj = d.pick(OBJECTS)
    other, _ = d.rng.choice([n for n in d.pool(NAMES) if n[0] != d.name])
    a = d.rng.randint(2, 99)
    story = [d.pick(OPENINGS).format(N=d.name, n=a, o=obj)]
    d.mentioned = True
    if a <= 33 and d.rng.random() < 0.5:
        k = d.rng.randint(2, 3)
        story.append(d.pick(COMPARE_TIMES).format(A=d.name, B=other, k=k, o=obj))
        b = d.apply(a, "x", k)
    else:
        n = d.rng.randint(2, 99)
        story.append(d.pick(COMPARE_MORE).format(A=d.name, B=other, n=n, o=obj))
        b = d.apply(a, "+", n)
    _distract(d, story)
    total = d.apply(a, "+", b)
    question = d.pick(TOTALS).format(A=d.name, B=other, o=obj)
    return Problem(" ".join(story + [question]), _finish(d.lines, total), str(total), "word_problems")


def held_groups(held_out: bool | str) -> frozenset:
    """The groups a split holds out: all (`True`), none (`False`) or the one named."""
    if held_out is True:
        return frozenset(GROUPS)
    if not held_out:
        return frozenset()
    if held_out not in GROUPS:
        raise UserError(f"word_problems: no held-out group {held_out!r} (groups: {', '.join(GROUPS)})")
    return frozenset([held_out])


def word_problems(rng: random.Random, difficulty: int, held_out: bool | str = False) -> Problem:
    """A problem of `max(2, difficulty)` or more operations, drawn from the held-out parts when `held_out`
    (of every group, or of the one group it names, the others drawn from the seen parts)."""
    steps = max(2, difficulty)
    held = held_groups(held_out)
    while True:
        d = _Draw(rng, held)
        roll = rng.random()
        problem = _compare(d) if roll < 0.2 and steps == 2 else _single(d, steps, money=roll < 0.55)
        # A problem that happened to use no part of its held-out group is one of the seen split's.
        if d.used or not held:
            return problem


def capacity(difficulty: int) -> int:
    """An upper bound on the distinct held-out problems: names x objects x sentence choices x operand values.

    Asking the unseen split for more than this can never be met, so it is refused before any drawing."""
    pools = [NAMES, OBJECTS, OPENINGS, QUESTIONS, SENTENCES, DISTRACTORS]
    per_choice = math.prod(len(p.held_out) for p in pools) * 2  # with or without a distractor
    verbs = sum(len(p.held_out) for p in (ADD, SUB, MUL, DIV, PACKS))
    return per_choice * 98 * (verbs * 98 * 10) ** max(2, difficulty)


def check_capacity(n: int, difficulty: int) -> None:
    limit = capacity(difficulty)
    if n > limit:
        raise UserError(f"word_problems: asked for {n:,} distinct unseen-phrasing problems, but the held-out parts "
                        f"can make at most {limit:,} at difficulty {difficulty}")


def has_distractor(prompt: str) -> bool:
    """Whether a prompt carries one of the distractor sentences (seen or held out)."""
    import re
    import string

    for part in DISTRACTORS.seen + DISTRACTORS.held_out:
        pattern = "".join(re.escape(lit) + (r"\S+" if field is not None else "")
                          for lit, field, *_ in string.Formatter().parse(part))
        if re.search(pattern, prompt):
            return True
    return False
