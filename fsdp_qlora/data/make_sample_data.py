"""Generate the bundled sample dataset: `python -m fsdp_qlora.data.make_sample_data`.

The examples are small templated tasks (reverse, uppercase, add, look up, repeat, sort) with
short, fully determined answers, so a tiny randomly initialised model shows a falling loss
within a few dozen optimizer steps. A fixed seed makes the committed file reproducible.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

SAMPLE_DATASET_PATH = Path(__file__).with_name("sample_instructions.jsonl")
NUM_EXAMPLES = 400
SEED = 1234

WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "rain", "star", "moon", "cake", "ship",
         "road", "lamp", "door", "milk", "rock", "leaf", "bell", "coat", "frog", "king", "ring", "snow"]
COLOURS = {"sky": "blue", "grass": "green", "banana": "yellow", "snow": "white", "coal": "black",
           "tomato": "red", "carrot": "orange", "plum": "purple", "cloud": "white", "leaf": "green",
           "lemon": "yellow", "cherry": "red", "night": "black", "ocean": "blue"}
OPPOSITES = {"hot": "cold", "up": "down", "big": "small", "fast": "slow", "day": "night", "open": "closed",
             "happy": "sad", "left": "right", "in": "out", "old": "new", "light": "dark", "wet": "dry",
             "early": "late", "full": "empty", "high": "low", "hard": "soft"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"

Example = dict[str, str]


def _example(instruction: str, output: str, input_text: str = "") -> Example:
    return {"instruction": instruction, "input": input_text, "output": output}


def reverse_words(rng: random.Random) -> Example:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return _example("Reverse the order of these words.", " ".join(reversed(words)), " ".join(words))


def uppercase_word(rng: random.Random) -> Example:
    word = rng.choice(WORDS)
    return _example(f"Write the word {word} in capital letters.", word.upper())


def add_numbers(rng: random.Random) -> Example:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    return _example(f"What is {a} + {b}?", str(a + b))


def name_colour(rng: random.Random) -> Example:
    thing = rng.choice(sorted(COLOURS))
    return _example(f"What colour is the {thing}?", f"The {thing} is {COLOURS[thing]}.")


def name_opposite(rng: random.Random) -> Example:
    word = rng.choice(sorted(OPPOSITES))
    return _example("Give the opposite of this word.", OPPOSITES[word], word)


def repeat_word(rng: random.Random) -> Example:
    word, times = rng.choice(WORDS), rng.randint(2, 5)
    return _example(f"Repeat the word {word} {times} times.", " ".join([word] * times))


def sort_letters(rng: random.Random) -> Example:
    letters = rng.sample(LETTERS, 3)
    return _example("Sort these letters alphabetically.", " ".join(sorted(letters)), " ".join(letters))


TASKS: list[Callable[[random.Random], Example]] = [
    reverse_words, uppercase_word, add_numbers, name_colour, name_opposite, repeat_word, sort_letters,
]


def make_examples(num_examples: int = NUM_EXAMPLES, seed: int = SEED) -> list[Example]:
    """`num_examples` distinct examples, tasks drawn uniformly; the same list for the same seed."""
    rng = random.Random(seed)
    examples: list[Example] = []
    seen: set[str] = set()
    # The small lookup tasks repeat quickly; duplicates would only over-weight them.
    while len(examples) < num_examples:
        example = rng.choice(TASKS)(rng)
        key = json.dumps(example, sort_keys=True)
        if key not in seen:
            seen.add(key)
            examples.append(example)
    return examples


def write_jsonl(examples: list[Example], path: Path) -> None:
    path.write_text("".join(json.dumps(example) + "\n" for example in examples))


if __name__ == "__main__":
    write_jsonl(make_examples(), SAMPLE_DATASET_PATH)
    print(f"wrote {NUM_EXAMPLES} examples to {SAMPLE_DATASET_PATH}")
