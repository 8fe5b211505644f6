"""Short stories in plain prose with a reading-comprehension question (word problems: `word_problems`)."""

from __future__ import annotations

import random

from tinylm.data.synthetic import Problem, _finish

NAMES = ["Mia", "Leo", "Ava", "Noah", "Zara", "Omar", "Lena", "Ravi", "Ines", "Kofi", "Yuki", "Sam", "Nora", "Tomas",
         "Priya", "Jonah", "Elif", "Marco", "Hana", "Diego", "Amara", "Felix", "Suki", "Ben", "Chloe", "Idris", "Maya",
         "Owen", "Tara", "Aziz"]
ITEMS = ["apples", "marbles", "stickers", "books", "cookies", "pencils", "coins", "shells", "cards", "stamps",
         "beads", "oranges", "crayons", "buttons", "postcards", "seeds", "ribbons", "toy cars"]


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


FAMILIES = {"stories": stories}
