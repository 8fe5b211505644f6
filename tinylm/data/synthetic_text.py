"""Synthetic families written as prose: GSM8K-style word problems and short stories with a question."""

from __future__ import annotations

import random

from tinylm.data.synthetic import Problem, _finish, worked

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zara", "Omar", "Lena", "Ravi", "Ines", "Kofi", "Yuki", "Sam", "Nora", "Tomas",
         "Priya", "Jonah", "Elif", "Marco", "Hana", "Diego", "Amara", "Felix", "Suki", "Ben", "Chloe", "Idris", "Maya",
         "Owen", "Tara", "Aziz"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "coins", "shells", "cards", "stamps",
         "beads", "oranges", "crayons", "buttons", "postcards", "seeds", "ribbons", "toy cars"]
PLACES = ["at the market", "in the garden", "at school", "at the beach", "in the attic", "at the library",
          "at the fair", "in the park"]
GOODS = [("pen", 2, 6), ("notebook", 3, 9), ("sandwich", 4, 12), ("ticket", 5, 20), ("plant", 6, 25),
         ("kite", 7, 30), ("scarf", 8, 35), ("lamp", 12, 60), ("puzzle", 9, 40), ("mug", 3, 15)]


# Word problems keep every operand between 2 and 99 and work each operation out column by column.

def _add(rng, name, friend, item, have):
    b = rng.randint(2, 99)
    text = rng.choice([f"{name} buys {b} more {item}.", f"{friend} gives {name} {b} {item}.",
                       f"Then {name} finds {b} {item} {rng.choice(PLACES)}.", f"Later, {name} gets {b} extra {item}."])
    return text, f"{worked(have, '+', b)}.", have + b


def _sub(rng, name, friend, item, have):
    b = rng.randint(2, min(99, have - 2))
    text = rng.choice([f"{name} gives {b} {item} to {friend}.", f"{name} loses {b} {item} on the way home.",
                       f"{name} uses {b} {item} for a school project.", f"{friend} borrows {b} of the {item}."])
    return text, f"{worked(have, '-', b)}.", have - b


def _mul(rng, name, friend, item, have):
    b = rng.randint(2, 5)
    text = rng.choice([f"By the end of the month the number of {item} is {b} times as large.",
                       f"{name} then collects enough {item} to have {b} times as many."])
    return text, f"{worked(have, 'x', b)}.", have * b


def _div(rng, name, friend, item, have):
    b = rng.choice(_divisors(have))
    text = rng.choice([f"{name} splits the {item} equally into {b} bags and keeps only one bag.",
                       f"{name} shares the {item} equally among {b} children, {name} included, and keeps one share."])
    return text, f"{worked(have, '/', b)}.", have // b


def _divisors(have: int) -> list[int]:
    """One-digit divisors that share `have` into equal parts of at least 2."""
    return [d for d in range(2, 10) if have % d == 0 and have // d >= 2]


def _allowed(have: int) -> list:
    ops = [_add] if have + 2 <= 999 else []
    if have >= 4:
        ops.append(_sub)
    if have <= 99:
        ops.append(_mul)
    if _divisors(have):
        ops.append(_div)
    return ops


def _inventory(rng: random.Random, difficulty: int) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    have = rng.randint(2, 99)
    story = [rng.choice([f"{name} has {have} {item}.", f"{name} starts the week with {have} {item}.",
                         f"There are {have} {item} in {name}'s box."])]
    lines = []
    for _ in range(max(2, difficulty)):
        text, line, have = rng.choice(_allowed(have))(rng, name, friend, item, have)
        story.append(text)
        lines.append(line)
    question = rng.choice([f"How many {item} does {name} have now?", f"How many {item} does {name} end up with?",
                           f"At the end, how many {item} does {name} have?"])
    return Problem(" ".join(story + [question]), _finish(lines, have), str(have), "word_problems")


def _plural(word: str) -> str:
    return word + ("es" if word.endswith(("ch", "sh", "s", "x")) else "s")


def _shopping(rng: random.Random, difficulty: int) -> Problem:
    """Goods at a price each, then the total or the change: two operations at difficulty 2, more above."""
    name = rng.choice(NAMES)
    wants_change = rng.random() < 0.5
    kinds = rng.sample(GOODS, max(1, difficulty - 1) if wants_change else max(2, difficulty))
    parts, lines, costs = [], [], []
    for good, low, high in kinds:
        count = rng.randint(2, 9)
        price = rng.randint(low, high)
        parts.append(f"{count} {_plural(good)} at ${price} each")
        lines.append(f"{count} {_plural(good)} cost {worked(price, 'x', count)} dollars.")
        costs.append(price * count)
    total = sum(costs)
    bought = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
    if len(costs) > 1:
        running = costs[0]
        for cost in costs[1:]:
            lines.append(f"Altogether {worked(running, '+', cost)} dollars.")
            running += cost
    if wants_change and total < 90:
        paid = rng.randrange(total // 10 * 10 + 10, 100, 10)
        lines.append(f"The change from {paid} dollars is {worked(paid, '-', total)} dollars.")
        prompt = f"{name} buys {bought}, and pays with ${paid}. How much change does {name} get, in dollars?"
        return Problem(prompt, _finish(lines, paid - total), str(paid - total), "word_problems")
    if len(costs) == 1:
        return _inventory(rng, difficulty)
    prompt = f"{name} buys {bought}. How much does {name} spend in total, in dollars?"
    return Problem(prompt, _finish(lines, total), str(total), "word_problems")


def word_problems(rng: random.Random, difficulty: int) -> Problem:
    """GSM8K-style problems of `max(2, difficulty)` or more operations on operands from 2 to 99."""
    return _inventory(rng, difficulty) if rng.random() < 0.65 else _shopping(rng, difficulty)


ANIMALS = ["fox", "rabbit", "owl", "turtle", "cat", "dog", "bear", "duck", "mouse", "goat", "hedgehog", "otter"]
SETTINGS = ["a quiet village by the river", "a busy town near the hills", "a small farm at the edge of the forest",
            "an old house by the sea", "a cabin high in the mountains", "a cottage beside a lake"]
GOALS = ["a red kite", "a lost key", "a silver bell", "a map of the valley", "a jar of honey", "a blue umbrella",
         "a wooden flute", "a box of paints", "a warm blanket", "a golden leaf"]
DESTINATIONS = ["the old mill", "the lighthouse", "the bakery", "the bridge", "the meadow", "the station",
                "the orchard", "the harbor", "the museum", "the hilltop"]
WEATHER = ["The morning was cold and bright.", "Rain had fallen all night, and the paths were muddy.",
           "It was a warm afternoon in late summer.", "A strong wind was blowing from the north.",
           "Snow covered the roofs and the fields.", "The sky was grey, and fog hung over the water."]
FEELINGS = ["happy", "tired but proud", "relieved", "excited", "calm", "grateful"]


def stories(rng: random.Random, difficulty: int) -> Problem:
    """A short story in plain prose followed by one reading-comprehension question about it."""
    hero, helper = rng.sample(NAMES, 2)
    animal = rng.choice(ANIMALS)
    goal, place = rng.choice(GOALS), rng.choice(DESTINATIONS)
    feeling = rng.choice(FEELINGS)
    number = rng.randint(2, 9)
    sentences = [
        rng.choice([f"{hero} lived in {rng.choice(SETTINGS)} with a small {animal}.",
                    f"In {rng.choice(SETTINGS)}, there lived a child named {hero} and a curious {animal}."]),
        rng.choice(WEATHER),
        rng.choice([f"One day {hero} decided to look for {goal}.", f"That day {hero} wanted to find {goal}.",
                    f"{hero} had heard a story about {goal} and wanted to see it."]),
        rng.choice([f"{hero} walked to {place}, counting {number} birds along the way.",
                    f"The road to {place} was long, and {hero} stopped {number} times to rest.",
                    f"{hero} and the {animal} went to {place}, crossing {number} little streams."]),
        rng.choice([f"There {hero} met {helper}, who knew the place well.",
                    f"At {place}, {helper} was waiting and offered to help.",
                    f"Near {place}, {hero} asked {helper} for directions."]),
        rng.choice([f"Together they searched until they found {goal} under a pile of leaves.",
                    f"{helper} pointed to a shelf, and there was {goal}.",
                    f"After some time, the {animal} found {goal} behind a stone."]),
        f"{hero} went home feeling {feeling}.",
    ]
    if difficulty >= 3:
        sentences.insert(5, rng.choice([f"It took them {number + 1} hours to search every corner.",
                                        f"They asked {number} neighbors, but nobody had seen it."]))
    questions = [
        (f"Where did {hero} go?", place.removeprefix("the "), f"{hero} went to {place}."),
        (f"Who helped {hero}?", helper, f"{helper} helped {hero}."),
        (f"What did {hero} look for?", goal.split(" ", 1)[1], f"{hero} looked for {goal}."),
        (f"What animal lived with {hero}?", animal, f"{hero} lived with a {animal}."),
    ]
    question, answer, because = rng.choice(questions)
    prompt = " ".join(sentences) + f"\n\nQuestion: {question}"
    return Problem(prompt, _finish([because], answer), answer, "stories")


FAMILIES = {"word_problems": word_problems, "stories": stories}
