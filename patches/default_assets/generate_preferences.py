"""Deterministic generator of the embedded preference dataset (``preferences_{train,eval}.jsonl``).

Each record is a small task whose answer is computed from the prompt (arithmetic, comparison, counting
letters, spelling backwards, antonyms, weekdays, plurals, colour mixing). The learnable preference
signal: the *chosen* answer is helpful — polite, restates the question and gives the correct answer.
The *rejected* answer is either unhelpful in style (dismissive, off-topic, or curt and wrong: easy to
learn), or — for half of the lookup-table tasks (antonyms, weekdays, plurals, colours), about two pairs
in nine — a minimal pair: the chosen sentence word for word with the wrong answer, which the model can
only tell apart by learning the mapping (72 of the 320 training pairs). Held-out eval pairs use the same
task families with fresh draws, so a rise in their reward accuracy shows the model learned the preference rather than the pairs.

Regenerate (byte-identical output) with ``python -m patches.default_assets.generate_preferences``.
"""
import json
import random
from pathlib import Path
from typing import Callable, Dict, List, Tuple

from patches.default_assets import EVAL_FILE, TRAIN_FILE

N_TRAIN, N_EVAL, SEED = 320, 64, 20240523

WORDS = [
    "apple", "river", "garden", "window", "pencil", "rocket", "candle", "forest", "planet", "button",
    "silver", "market", "basket", "dragon", "ticket", "mirror", "orange", "castle", "pillow", "spider",
]
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("early", "late"), ("open", "closed"), ("full", "empty"), ("strong", "weak"), ("high", "low"),
    ("loud", "quiet"), ("old", "new"), ("rich", "poor"), ("wet", "dry"), ("hard", "soft"),
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
NOUNS = ["cat", "dog", "book", "tree", "car", "house", "bird", "lamp", "chair", "cloud", "shoe", "road"]
COLOUR_MIXES = [
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"),
]
CHOSEN_OPENERS = ["Sure! ", "Happy to help. ", "Good question. ", "Of course. "]
DISMISSIVE = [
    "I don't feel like answering that.", "Figure it out yourself.", "That is a boring question.",
    "Ask someone else, I am busy.", "Why would I know that?",
]
OFF_TOPIC = [
    "Bananas are my favourite snack.", "The weather was nice last weekend.", "I once saw a very tall giraffe.",
    "My phone needs a new case.", "Trains are louder than buses.",
]

#: a task returns (prompt, helpful statement of the correct answer, the bare answer, a wrong answer)
Task = Callable[[random.Random], Tuple[str, str, str, str]]


def _addition(rng: random.Random):
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b), str(a + b + rng.choice([-3, -1, 2, 5]))


def _subtraction(rng: random.Random):
    a = rng.randint(20, 90)
    b = rng.randint(1, a - 1)
    return f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", str(a - b), str(a - b + rng.choice([-2, 1, 4]))


def _larger(rng: random.Random):
    a, b = rng.sample(range(1, 100), 2)
    return (f"Which number is larger, {a} or {b}?", f"{max(a, b)} is larger than {min(a, b)}.",
            str(max(a, b)), str(min(a, b)))


def _count_letters(rng: random.Random):
    word = rng.choice(WORDS)
    return (f"How many letters are in the word {word}?", f"The word {word} has {len(word)} letters.",
            str(len(word)), str(len(word) + rng.choice([-2, -1, 1, 3])))


def _backwards(rng: random.Random):
    word = rng.choice(WORDS)
    return (f"Spell the word {word} backwards.", f"{word} spelled backwards is {word[::-1]}.",
            word[::-1], word[::-1][1:] + word[::-1][0])


def _antonym(rng: random.Random):
    word, opposite = rng.choice(ANTONYMS)
    if rng.random() < 0.5:
        word, opposite = opposite, word
    return f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.", opposite, word


def _next_weekday(rng: random.Random):
    i = rng.randrange(7)
    day, after = WEEKDAYS[i], WEEKDAYS[(i + 1) % 7]
    return f"Which day comes after {day}?", f"The day after {day} is {after}.", after, WEEKDAYS[(i + 3) % 7]


def _plural(rng: random.Random):
    noun = rng.choice(NOUNS)
    return f"What is the plural of {noun}?", f"The plural of {noun} is {noun}s.", f"{noun}s", f"{noun}es"


def _colour_mix(rng: random.Random):
    first, second, mixed = rng.choice(COLOUR_MIXES)
    wrong = rng.choice([c for _, _, c in COLOUR_MIXES if c != mixed])
    return (f"What colour do you get by mixing {first} and {second}?",
            f"Mixing {first} and {second} gives {mixed}.", mixed, wrong)


TASKS: List[Task] = [_addition, _subtraction, _larger, _count_letters, _backwards, _antonym, _next_weekday,
                     _plural, _colour_mix]
#: tasks answered from a small table, whose statement ends with "<answer>.": candidates for minimal pairs
LOOKUP_TASKS = (_antonym, _next_weekday, _plural, _colour_mix)


def make_record(rng: random.Random, task: Task) -> Dict[str, str]:
    """One ``{"prompt", "chosen", "rejected"}`` record: chosen helpful and correct, rejected unhelpful or wrong."""
    question, statement, answer, wrong = task(rng)
    opener = rng.choice(CHOSEN_OPENERS)
    chosen = opener + statement
    kind = rng.randrange(3)
    if task in LOOKUP_TASKS and rng.random() < 0.5:
        rejected = opener + statement[: -len(answer) - 1] + wrong + "."  # same sentence, wrong answer
    elif kind == 0:
        rejected = rng.choice(DISMISSIVE)
    elif kind == 1:
        rejected = rng.choice(OFF_TOPIC)
    else:
        rejected = f"{wrong}, obviously."
    return {"prompt": f"Question: {question}\nAnswer:", "chosen": " " + chosen, "rejected": " " + rejected}


def generate(n_records: int, seed: int) -> List[Dict[str, str]]:
    rng = random.Random(seed)
    return [make_record(rng, TASKS[i % len(TASKS)]) for i in range(n_records)]


def render_jsonl(records: List[Dict[str, str]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def expected_files() -> Dict[Path, str]:
    """The exact text of both shipped files (eval operands come from a different seed)."""
    return {TRAIN_FILE: render_jsonl(generate(N_TRAIN, SEED)), EVAL_FILE: render_jsonl(generate(N_EVAL, SEED + 1))}


def main() -> None:
    for path, text in expected_files().items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path} ({text.count(chr(10))} records)")


if __name__ == "__main__":
    main()
