"""Generate hone's evaluation task suites (deterministic: fixed seeds, answers computed here).

    python tasks/make_suites.py [--data-dir /work/shared/data]

Writes, next to this file:
  storage.jsonl  multi-turn: save a fact in one thread, recall it in a fresh one (storage tool)
  python.jsonl   single-turn: computations meant for the Python sandbox
  mixed.jsonl    multi-turn: store numbers, then look them up and compute with the calculator
  asdiv-a-sample.jsonl, gsm8k-sample.jsonl  fixed-seed samples of the arithmetic word-problem
                 sets in --data-dir (skipped with a message when it is missing; the committed
                 files are then kept)

After writing, every file is read back and validated (see `validate`); any problem raises
SystemExit with a message. Format and check rules: tasks/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import string
import sys
from decimal import Decimal
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from learner.checks import CHECKS, check_answer, default_check, last_number  # noqa: E402

STORAGE_SEED = 20240601
STORAGE_GUARD_SEED = 20240611  # bench/data/storage-guard.jsonl: the learner gate's storage guard
STORAGE_TRAIN_SEED = 20240621  # bench/data/storage-train.jsonl: storage traffic for `hone bench loop`
PYTHON_GUARD_SEED = 20240612  # bench/data/python-guard.jsonl: the learner gate's python guard
PYTHON_TRAIN_SEED = 20240622  # bench/data/python-train.jsonl: python traffic for `hone bench loop`
N_PYTHON_TRAIN_ROUNDS = 6  # one task per family a round: 90 tasks
N_STORAGE_TRAIN = 126
PYTHON_SEED = 20240602
MIXED_SEED = 20240603
SAMPLE_SEED = 0
N_ASDIV = 60
N_GSM8K = 40
DEFAULT_DATA_DIR = Path("/work/shared/data")
GUARD = HERE.parent / "bench" / "data" / "storage-guard.jsonl"
STORAGE_TRAIN = HERE.parent / "bench" / "data" / "storage-train.jsonl"
PYTHON_GUARD = HERE.parent / "bench" / "data" / "python-guard.jsonl"
PYTHON_TRAIN = HERE.parent / "bench" / "data" / "python-train.jsonl"


# --------------------------------------------------------------------------------------------
# helpers

class Rng(random.Random):
    """random.Random plus `cycle`: draws from a sequence without repeats until it is used up
    (then reshuffles), so facts, items and phrasings are spread evenly over a suite."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self._decks: dict[int, list] = {}

    def cycle(self, seq):
        deck = self._decks.get(id(seq))
        if not deck:
            deck = list(seq)
            self.shuffle(deck)
            self._decks[id(seq)] = deck
        return deck.pop()


def digits(rng: random.Random, n: int) -> int:
    """A random n-digit number with no leading zero."""
    return rng.randint(10 ** (n - 1), 10**n - 1)


def num(d: Decimal) -> int | float:
    """A Decimal as a plain JSON number: int when integral, else float (short decimals only)."""
    if d == d.to_integral_value():
        return int(d)
    f = float(d)
    if Decimal(repr(f)) != d:
        raise AssertionError(f"{d} is not a short exact decimal")
    return f


def fmt(d: Decimal | int) -> str:
    """How a number is written in a question: 12, 2.5, 4.75 (no trailing zeros)."""
    d = Decimal(d)
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def turn(content: str, new_thread: bool) -> dict:
    return {"content": content, "new_thread": new_thread}


def numbers_in(text: str) -> list[float]:
    out = []
    for m in re.findall(r"-?\d[\d,]*(?:\.\d+)?", text):
        v = last_number(m)
        if v is not None:
            out.append(v)
    return out


def passes(reply: str, answer, check: str) -> bool:
    return check_answer(reply, answer, check)


# --------------------------------------------------------------------------------------------
# storage suite

# (description, key, value maker) -- numeric facts, answers checked numerically
NUM_FACTS = [
    ("my locker code", "locker_code", lambda r: digits(r, 4)),
    ("my gym PIN", "gym_pin", lambda r: digits(r, 4)),
    ("my apartment number", "apartment_number", lambda r: digits(r, 3)),
    ("my parking spot number", "parking_spot", lambda r: digits(r, 3)),
    ("my employee ID", "employee_id", lambda r: digits(r, 6)),
    ("my hotel room number", "hotel_room", lambda r: digits(r, 4)),
    ("my bike lock combination", "bike_lock", lambda r: digits(r, 4)),
    ("my library card number", "library_card", lambda r: digits(r, 7)),
    ("the year my house was built", "house_year", lambda r: r.randint(1890, 2015)),
    ("my order number", "order_number", lambda r: digits(r, 6)),
    ("the number of wedding guests", "guest_count", lambda r: r.randint(40, 180)),
    ("my door code", "door_code", lambda r: digits(r, 5)),
    ("my seat number", "seat_number", lambda r: r.randint(11, 99)),
    ("my customer number", "customer_number", lambda r: digits(r, 8)),
]

DOG_NAMES = ["Biscuit", "Pretzel", "Waffles", "Juniper", "Marmalade", "Noodle", "Pickles", "Tofu"]
COLORS = ["turquoise", "magenta", "crimson", "lavender", "chartreuse", "vermilion", "indigo"]
CODENAMES = ["Nightjar", "Bluefin", "Stormcrow", "Quokka", "Firefly", "Kestrel", "Marigold"]
CITIES = ["Lisbon", "Nairobi", "Reykjavik", "Montevideo", "Hanoi", "Tbilisi", "Valparaiso"]
ROOMS = ["Orchid", "Sequoia", "Aurora", "Tamarind", "Zephyr", "Cobalt"]
FRUITS = ["mango", "papaya", "kumquat", "lychee", "persimmon", "rambutan", "guava"]
PW_WORDS = ["maple", "otter", "comet", "cedar", "falcon", "pebble", "tundra", "walnut", "harbor"]


def booking_ref(r: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(r.choice(letters) for _ in range(3)) + str(digits(r, 3))


def plate(r: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPRSTUVWXYZ"
    a, b = r.choice(letters), r.choice(letters)
    n = digits(r, 3)
    c, d = r.choice(letters), r.choice(letters)
    return f"{a}{b}-{n}-{c}{d}"


def password(r: random.Random) -> str:
    a, b = r.sample(PW_WORDS, 2)
    return f"{a}-{b}-{r.randint(10, 99)}"


# (description, key, value maker) -- text facts, answers checked with "contains"
TEXT_FACTS = [
    ("my dog's name", "dog_name", lambda r: r.cycle(DOG_NAMES)),
    ("my favorite color", "favorite_color", lambda r: r.cycle(COLORS)),
    ("the project codename", "project_codename", lambda r: r.cycle(CODENAMES)),
    ("my favorite city", "favorite_city", lambda r: r.cycle(CITIES)),
    ("the meeting room name", "meeting_room", lambda r: r.cycle(ROOMS)),
    ("my favorite fruit", "favorite_fruit", lambda r: r.cycle(FRUITS)),
    ("my wifi password", "wifi_password", password),
    ("my booking reference", "booking_ref", booking_ref),
    ("my license plate", "license_plate", plate),
]

SAVE_TEMPLATES = [
    "Save {desc} {value} in storage under the key {key}.",
    "Please store {desc}, which is {value}, using the storage tool with the key {key}.",
    "Remember this for later: {desc} is {value}. Put it in storage under the key {key}.",
    "Use the storage tool to save {value} under the key {key}. It is {desc}.",
    "Store {value} in storage with the key {key}. That is {desc}.",
]

RECALL_TEMPLATES = [
    "What is {desc}? Look it up in storage under {key}.",
    "Use the storage tool to get the value of {key}. What is {desc}?",
    "I forgot {desc}. Please read the key {key} from storage and tell me.",
    "Check storage for the key {key} and tell me {desc}.",
    "Get {key} from storage. What is {desc}?",
]

UPDATE_TEMPLATES = [
    "{Desc} has changed. Update the key {key} in storage to {value}.",
    "Overwrite {key} in storage with the new value {value}. That is {desc} now.",
    "Please put {value} under the key {key} in storage, replacing the old value. It is {desc} now.",
]


def capital(s: str) -> str:
    return s[0].upper() + s[1:]


def make_fact(rng: random.Random, kind: str, exclude_keys: set[str] = frozenset()):
    pool = NUM_FACTS if kind == "numeric" else TEXT_FACTS
    while True:
        desc, key, maker = rng.cycle(pool)
        if key not in exclude_keys:
            return desc, key, maker


def save_text(rng, desc, key, value) -> str:
    return rng.cycle(SAVE_TEMPLATES).format(desc=desc, key=key, value=value)


def recall_text(rng, desc, key) -> str:
    return rng.cycle(RECALL_TEMPLATES).format(desc=desc, key=key)


def storage_suite(seed: int = STORAGE_SEED, prefix: str = "storage",
                  exclude: frozenset[tuple] = frozenset(), n: int = 42) -> list[dict]:
    """`exclude`: turn texts (tuples) that must not recur, so a second draw is disjoint from the first.
    `n` tasks in the suite's mix: 2/3 save then recall, 1/6 two saves, 1/6 overwrites."""
    rng = Rng(seed)
    plans = (["save_recall"] * (n - 2 * (n // 6))) + (["two_saves"] * (n // 6)) + (["overwrite"] * (n // 6))
    tasks: list[dict] = []
    seen: set[tuple] = set(exclude)
    i = 0
    while len(tasks) < len(plans):
        plan = plans[len(tasks)]
        kind = "numeric" if (len(tasks) % 2 == 0) else "contains"
        distractors: list = []
        if plan == "save_recall":
            desc, key, maker = make_fact(rng, kind)
            value = maker(rng)
            turns = [turn(save_text(rng, desc, key, value), False),
                     turn(recall_text(rng, desc, key), True)]
            answer = value
        elif plan == "two_saves":
            d1, k1, m1 = make_fact(rng, kind)
            kind2 = rng.choice(["numeric", "contains"])
            d2, k2, m2 = make_fact(rng, kind2, {k1})
            v1, v2 = m1(rng), m2(rng)
            turns = [turn(save_text(rng, d1, k1, v1), False),
                     turn(save_text(rng, d2, k2, v2), rng.random() < 0.5)]
            if rng.random() < 0.5:
                turns.append(turn(recall_text(rng, d1, k1), True))
                answer, distractors = v1, [v2]
            else:
                turns.append(turn(recall_text(rng, d2, k2), True))
                answer, distractors, kind = v2, [v1], kind2
        else:  # overwrite
            desc, key, maker = make_fact(rng, kind)
            old, new = maker(rng), maker(rng)
            if old == new:
                continue
            turns = [turn(save_text(rng, desc, key, old), False),
                     turn(rng.cycle(UPDATE_TEMPLATES).format(
                         desc=desc, Desc=capital(desc), key=key, value=new), rng.random() < 0.5),
                     turn(recall_text(rng, desc, key), True)]
            answer, distractors = new, [old]
        sig = tuple(t["content"] for t in turns)
        if sig in seen or any(passes(str(d), answer, kind) for d in distractors):
            continue
        if not last_turn_ok(turns[-1]["content"], answer, kind):
            continue
        seen.add(sig)
        tasks.append({"id": f"{prefix}-{i:03d}", "turns": turns, "answer": answer,
                      "check": kind, "type": "storage"})
        i += 1
    return tasks


# --------------------------------------------------------------------------------------------
# python suite

def is_prime(n: int) -> bool:
    if n < 2:
        return False
    for p in range(2, math.isqrt(n) + 1):
        if n % p == 0:
            return False
    return True


def fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def collatz_steps(n: int) -> int:
    steps = 0
    while n != 1:
        n = n // 2 if n % 2 == 0 else 3 * n + 1
        steps += 1
    return steps


def ordinal(k: int) -> str:
    if 10 <= k % 100 <= 20:
        return f"{k}th"
    return f"{k}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


SENTENCE_WORDS = ("the quick brown fox jumps over the lazy dog while seven eager bees hum "
                  "near a green meadow and three sleepy cats watch the river flow past tall "
                  "trees under heavy evening clouds").split()


def py_sum_squares(r):
    a, b = r.randint(1, 30), r.randint(60, 250)
    return (f"Use Python to compute the sum of the squares of all integers from {a} to {b} "
            f"inclusive.", sum(k * k for k in range(a, b + 1)))


def py_count_primes(r):
    n = r.randrange(1000, 30001, 500)
    return (f"Use Python to count how many prime numbers are less than {n}.",
            sum(1 for k in range(n) if is_prime(k)))


def py_sum_primes(r):
    n = r.randrange(100, 3001, 50)
    return (f"Write Python code to find the sum of all prime numbers below {n}.",
            sum(k for k in range(n) if is_prime(k)))


def py_factorial_digits(r):
    n = r.randint(25, 120)
    return (f"Use Python to find the sum of the digits of the factorial of {n}.",
            sum(int(c) for c in str(math.factorial(n))))


def py_fibonacci(r):
    n = r.randint(30, 75)
    return (f"The Fibonacci numbers start 1, 1, 2, 3, 5, 8 and each one is the sum of the two "
            f"before it. Use Python to find the {ordinal(n)} Fibonacci number.", fib(n))


def py_gcd(r):
    g = r.randint(6, 60)
    ms = r.sample(range(7, 60), r.randint(3, 4))
    nums = [g * m for m in ms]
    return (f"Use Python to find the greatest common divisor of {', '.join(map(str, nums))}.",
            math.gcd(*nums))


def py_lcm(r):
    nums = r.sample(range(6, 48), r.randint(3, 4))
    return (f"Use Python to find the least common multiple of {', '.join(map(str, nums))}.",
            math.lcm(*nums))


def py_divisors(r):
    n = r.choice([r.randint(10_000, 999_999), 2 ** r.randint(2, 5) * 3 ** r.randint(1, 4)
                  * 5 ** r.randint(0, 2) * 7 ** r.randint(0, 2)])
    return (f"Use Python to count the positive divisors of {n}.",
            sum(1 for d in range(1, n + 1) if n % d == 0))


def py_pow2_digits(r):
    n = r.randint(100, 1000)
    return (f"Use Python to compute the sum of the digits of 2 to the power {n}.",
            sum(int(c) for c in str(2**n)))


def py_count_letter(r):
    words = [r.choice(SENTENCE_WORDS) for _ in range(r.randint(9, 14))]
    text = " ".join(words)
    letters = [c for c in sorted(set(text)) if c.isalpha() and text.count(c) >= 3]
    letter = r.choice(letters)
    return (f"Use Python to count how many times the letter '{letter}' appears in this text: "
            f"\"{text}\"", text.count(letter))


def py_kth(r):
    xs = r.sample(range(10, 1000), r.randint(12, 16))
    k = r.randint(2, 5)
    if r.random() < 0.5:
        return (f"Here is a list of numbers: {xs}. Use Python to sort it in ascending order and "
                f"give the {ordinal(k)} smallest number.", sorted(xs)[k - 1])
    return (f"Here is a list of numbers: {xs}. Use Python to sort it in descending order and "
            f"give the {ordinal(k)} largest number.", sorted(xs, reverse=True)[k - 1])


def py_multiples(r):
    n = r.randrange(500, 10001, 100)
    a, b = r.choice([(3, 5), (3, 7), (4, 6), (5, 7)])
    return (f"Use Python to add up all the positive integers below {n} that are multiples of "
            f"{a} or {b}.", sum(k for k in range(1, n) if k % a == 0 or k % b == 0))


def py_collatz(r):
    n = r.randint(27, 999)
    return (f"Start from {n}. If the number is even, halve it; if it is odd, multiply it by 3 and "
            f"add 1. Repeat until you reach 1. Use Python to count the steps.", collatz_steps(n))


def py_binary_ones(r):
    n = r.randint(10**6, 10**9)
    return (f"Use Python to count the 1 bits in the binary representation of {n}.",
            bin(n).count("1"))


def py_reverse(r):
    s = "".join(r.choice(string.ascii_lowercase) for _ in range(r.randint(9, 12)))
    return (f"Use Python to reverse the string \"{s}\" and print the result.", s[::-1])


PY_FAMILIES = [py_sum_squares, py_count_primes, py_sum_primes, py_factorial_digits,
               py_fibonacci, py_gcd, py_lcm, py_divisors, py_pow2_digits, py_count_letter,
               py_kth, py_multiples, py_collatz, py_binary_ones, py_reverse]


def python_suite(seed: int = PYTHON_SEED, prefix: str = "python", exclude: frozenset[str] = frozenset(),
                 rounds: int = 3) -> list[dict]:
    """`exclude`: questions that must not recur, so a second draw is disjoint from the first."""
    rng = Rng(seed)
    tasks, seen = [], set(exclude)
    for _round in range(rounds):
        for family in PY_FAMILIES:
            while True:
                q, answer = family(rng)
                check = "numeric" if isinstance(answer, int) else "contains"
                # echoing the question must not pass, and no duplicate questions
                if q not in seen and not passes(q, answer, check):
                    break
            seen.add(q)
            tasks.append({"id": f"{prefix}-{len(tasks):03d}", "question": q, "answer": answer,
                          "check": check, "type": "python"})
    return tasks


# --------------------------------------------------------------------------------------------
# mixed suite (storage + calculator)

D = Decimal
# (item singular, item plural, key, unit prices to choose from)
PRICED_ITEMS = [
    ("notebook", "notebooks", "notebook_price", [D(n) for n in range(3, 40)]),
    ("concert ticket", "concert tickets", "ticket_price", [D(n) for n in range(25, 120)]),
    ("bag of coffee", "bags of coffee", "coffee_price",
     [D("7.5"), D("8.25"), D("9.5"), D("12.75"), D("14")]),
    ("pizza", "pizzas", "pizza_price", [D("11.5"), D("12"), D("13.25"), D("14.5"), D("16")]),
    ("paint can", "paint cans", "paint_price", [D(n) for n in range(18, 60)]),
    ("bus pass", "bus passes", "bus_pass_price", [D("2.25"), D("2.75"), D("3.5"), D("4.25")]),
    ("chair", "chairs", "chair_price", [D(n) for n in range(35, 150)]),
]

RATES = [  # (description, key, unit, how many of what)
    ("my hourly wage", "hourly_wage", "dollars", "hours",
     [D(n) for n in range(14, 45)] + [D("18.5"), D("22.5")]),
    ("the distance I cycle each day", "daily_distance", "kilometers", "days",
     [D(n) for n in range(8, 40)]),
    ("the water my garden uses per day", "garden_water", "liters", "days",
     [D(n) for n in range(20, 90)]),
]

BALANCES = [  # (description, key, unit, add-phrase, subtract-phrase)
    ("my savings balance", "savings", "dollars", "I deposited {x} dollars",
     "I withdrew {x} dollars"),
    ("my trip budget", "trip_budget", "dollars", "I got a bonus of {x} dollars",
     "I spent {x} dollars on the hotel"),
    ("the number of books in the library", "book_count", "books", "{x} new books arrived",
     "{x} books were given away"),
    ("the number of steps I walked this morning", "morning_steps", "steps",
     "I walked {x} more steps in the afternoon", "my watch over-counted by {x} steps"),
    ("the warehouse stock of boxes", "box_stock", "boxes", "a delivery brought {x} boxes",
     "{x} boxes were shipped out"),
    ("my account balance", "account_balance", "dollars", "I was paid {x} dollars",
     "I paid a bill of {x} dollars"),
]

SPLITS = [  # (description, key, unit, divisor phrase, question)
    ("the dinner bill", "dinner_bill", "dollars", "people",
     "split it equally among {n} people. How much does each person pay?"),
    ("the total rent for the cabin", "cabin_rent", "dollars", "friends",
     "divide it equally among {n} friends. How much does each friend pay?"),
    ("the length of the rope", "rope_length", "meters", "pieces",
     "cut it into {n} equal pieces. How long is each piece in meters?"),
    ("the fuel budget for the month", "fuel_budget", "dollars", "weeks",
     "divide it evenly over {n} weeks. How much is that per week?"),
    ("the trail length", "trail_length", "kilometers", "days",
     "divide it evenly over {n} days of hiking. How many kilometers per day?"),
]

PAIRS = [  # (desc a, key a, range a, desc b, key b, range b, unit, op, question)
    ("the length of the garden", "garden_length", (8, 40), "the width of the garden",
     "garden_width", (4, 25), "meters", "*", "find the area of the garden in square meters."),
    ("the number of boxes", "box_count", (6, 40), "the number of apples in each box",
     "apples_per_box", (12, 48), "", "*", "find how many apples there are in total."),
    ("the number of shelves", "shelf_count", (5, 30), "the number of books on each shelf",
     "books_per_shelf", (15, 60), "", "*", "find how many books there are in total."),
    ("the ticket sales on Saturday", "saturday_sales", (150, 900), "the ticket sales on Sunday",
     "sunday_sales", (120, 900), "tickets", "+", "find the total ticket sales for both days."),
    ("my rent", "monthly_rent", (650, 2400), "my grocery bill", "grocery_bill", (90, 650),
     "dollars", "+", "find the total of the two."),
    ("the price of the laptop", "laptop_price", (450, 2200), "the discount on the laptop",
     "laptop_discount", (25, 300), "dollars", "-", "find the price after the discount."),
    ("the height of the tower", "tower_height", (45, 330), "the height of the tree",
     "tree_height", (6, 40), "meters", "-", "find how much taller the tower is than the tree."),
]

LOOKUP_PHRASES = [
    "Look up {key} in storage and use the calculator to {q}",
    "Get {key} from storage, then use the calculator to {q}",
    "Read the key {key} from storage and use the calculator to {q}",
]


def with_unit(v: Decimal, unit: str) -> str:
    return f"{fmt(v)} {unit}".strip()


STORE_TEMPLATES = [
    "Store {desc}, {v}, under the key {key}.",
    "Save {desc} in storage under the key {key}. It is {v}.",
    "Use the storage tool to save {desc}, which is {v}, with the key {key}.",
    "Remember {desc} for later: {v}. Put it in storage under the key {key}.",
]


def store_text(rng, desc, key, value_text) -> str:
    return rng.cycle(STORE_TEMPLATES).format(desc=desc, key=key, v=value_text)


def mixed_multiply(rng):
    if rng.random() < 0.6:
        item, items, key, prices = rng.cycle(PRICED_ITEMS)
        price, qty = rng.choice(prices), rng.randint(3, 25)
        t1 = store_text(rng, f"the price of a {item}", key, f"{fmt(price)} dollars")
        q = f"find the cost of {qty} {items}."
    else:
        desc, key, unit, what, vals = rng.cycle(RATES)
        price, qty = rng.choice(vals), rng.randint(3, 30)
        t1 = store_text(rng, desc, key, with_unit(price, unit))
        q = f"find the total for {qty} {what}."
    t2 = rng.cycle(LOOKUP_PHRASES).format(key=key, q=q)
    return [turn(t1, False), turn(t2, True)], price * qty


def mixed_add_sub(rng, op):
    desc, key, unit, add_p, sub_p = rng.cycle(BALANCES)
    value = D(rng.randint(300, 9000))
    x = D(rng.randint(15, 290))
    t1 = store_text(rng, desc, key, with_unit(value, unit))
    event = (add_p if op == "+" else sub_p).format(x=fmt(x))
    q = f"add {fmt(x)} to it." if op == "+" else f"subtract {fmt(x)} from it."
    t2 = f"{capital(event)}. " + rng.cycle(LOOKUP_PHRASES).format(key=key, q=q) \
        + " What is the new value?"
    return [turn(t1, False), turn(t2, True)], value + x if op == "+" else value - x


def mixed_divide(rng):
    desc, key, unit, _what, question = rng.cycle(SPLITS)
    n = rng.randint(3, 8)
    share = rng.choice([D(rng.randint(9, 95)), D(rng.randint(9, 95)) + D("0.5"),
                        D(rng.randint(9, 95)) + D("0.25")])
    total = share * n
    t1 = store_text(rng, desc, key, with_unit(total, unit))
    t2 = rng.cycle(LOOKUP_PHRASES).format(key=key, q=question.format(n=n))
    return [turn(t1, False), turn(t2, True)], share


def mixed_pair(rng):
    da, ka, ra, db, kb, rb, unit, op, q = rng.cycle(PAIRS)
    a, b = D(rng.randint(*ra)), D(rng.randint(*rb))
    t1 = store_text(rng, da, ka, with_unit(a, unit))
    t2 = store_text(rng, db, kb, with_unit(b, unit))
    t3 = rng.choice([
        "Look up {ka} and {kb} in storage and use the calculator to {q}",
        "Get {ka} and {kb} from storage, then use the calculator to {q}",
    ]).format(ka=ka, kb=kb, q=q)
    ans = a * b if op == "*" else a + b if op == "+" else a - b
    # the one-value answers (a, b) must not pass
    return [turn(t1, False), turn(t2, rng.random() < 0.5), turn(t3, True)], ans, [a, b]


def mixed_update(rng):
    item, items, key, prices = rng.cycle(PRICED_ITEMS)
    old, new = rng.sample(prices, 2)
    qty = rng.randint(3, 20)
    t1 = store_text(rng, f"the price of a {item}", key, f"{fmt(old)} dollars")
    t2 = rng.choice([
        "The price of a {item} has changed. Update {key} in storage to {v} dollars.",
        "Overwrite {key} in storage with the new price, {v} dollars.",
    ]).format(item=item, key=key, v=fmt(new))
    t3 = rng.cycle(LOOKUP_PHRASES).format(key=key, q=f"find the cost of {qty} {items}.")
    return [turn(t1, False), turn(t2, rng.random() < 0.5), turn(t3, True)], new * qty, [old * qty]


def mixed_suite() -> list[dict]:
    rng = Rng(MIXED_SEED)
    plans = (["mul"] * 8) + (["add"] * 6) + (["sub"] * 6) + (["div"] * 6) + (["pair"] * 10) \
        + (["update"] * 6)
    tasks, seen = [], set()
    while len(tasks) < len(plans):
        plan = plans[len(tasks)]
        distractors: list = []
        if plan == "mul":
            turns, ans = mixed_multiply(rng)
        elif plan in ("add", "sub"):
            turns, ans = mixed_add_sub(rng, "+" if plan == "add" else "-")
        elif plan == "div":
            turns, ans = mixed_divide(rng)
        elif plan == "pair":
            turns, ans, distractors = mixed_pair(rng)
        else:
            turns, ans, distractors = mixed_update(rng)
        answer = num(ans)
        sig = tuple(t["content"] for t in turns)
        if sig in seen or any(passes(fmt(d), answer, "numeric") for d in distractors):
            continue
        if not last_turn_ok(turns[-1]["content"], answer, "numeric"):
            continue
        seen.add(sig)
        tasks.append({"id": f"mixed-{len(tasks):03d}", "turns": turns, "answer": answer,
                      "check": "numeric", "type": "mixed"})
    return tasks


# --------------------------------------------------------------------------------------------
# arithmetic word-problem samples

def sample_file(src: Path, n: int, kind: str) -> list[dict]:
    lines = src.read_text(encoding="utf-8").splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    idx = sorted(random.Random(SAMPLE_SEED).sample(range(len(rows)), n))
    return [{**rows[i], "type": kind} for i in idx]


# --------------------------------------------------------------------------------------------
# validation

def last_turn_ok(text: str, answer, check: str) -> bool:
    """The last turn alone must not give the answer away: echoing it fails the check, and for
    numeric answers no number written in it equals the answer."""
    if passes(text, answer, check):
        return False
    if check == "numeric":
        want = float(answer)
        return not any(math.isclose(v, want, rel_tol=1e-6, abs_tol=1e-9) for v in numbers_in(text))
    return True


def validate(paths: list[Path]) -> dict[str, int]:
    problems, ids, counts = [], set(), {}
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        counts[path.name] = 0
        for n, line in enumerate(lines, 1):
            where = f"{path.name}:{n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                problems.append(f"{where}: not JSON: {e}")
                continue
            counts[path.name] += 1
            tid, answer = obj.get("id"), obj.get("answer")
            if not isinstance(tid, str) or not tid:
                problems.append(f"{where}: bad id {tid!r}")
            elif tid in ids:
                problems.append(f"{where}: duplicate id {tid!r}")
            ids.add(tid)
            if not obj.get("type"):
                problems.append(f"{where}: missing type")
            if answer is None or isinstance(answer, bool):
                problems.append(f"{where}: bad answer {answer!r}")
                continue
            check = obj.get("check") or default_check(answer)
            if check not in CHECKS:
                problems.append(f"{where}: unknown check {check!r}")
                continue
            if check == "numeric" and not isinstance(answer, (int, float)):
                problems.append(f"{where}: numeric answer {answer!r} is not a plain number")
            try:
                if not check_answer(str(answer), answer, check):
                    problems.append(f"{where}: answer {answer!r} fails its own {check} check")
            except ValueError as e:
                problems.append(f"{where}: {e}")
                continue
            if "turns" in obj:
                turns = obj["turns"]
                if not (isinstance(turns, list) and len(turns) >= 2 and all(
                        isinstance(t, dict) and isinstance(t.get("content"), str)
                        and t["content"].strip() and isinstance(t.get("new_thread"), bool)
                        for t in turns)):
                    problems.append(f"{where}: malformed turns")
                    continue
                if turns[0]["new_thread"]:
                    problems.append(f"{where}: first turn has new_thread true")
                if not turns[-1]["new_thread"]:
                    problems.append(f"{where}: last turn must start a new thread")
                if not last_turn_ok(turns[-1]["content"], answer, check):
                    problems.append(f"{where}: last turn gives the answer {answer!r} away")
            elif isinstance(obj.get("question"), str) and obj["question"].strip():
                if obj["type"] == "python" and check_answer(obj["question"], answer, check):
                    problems.append(f"{where}: echoing the question passes")
            else:
                problems.append(f"{where}: needs a non-empty question or turns")
    if problems:
        raise SystemExit("task validation failed:\n  " + "\n  ".join(problems))
    return counts


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                    help="folder with asdiv-a.jsonl and gsm8k-test.jsonl (default %(default)s)")
    args = ap.parse_args(argv)

    suites = {"storage.jsonl": storage_suite(), "python.jsonl": python_suite(),
              "mixed.jsonl": mixed_suite()}
    for name, rows in suites.items():
        write_jsonl(HERE / name, rows)
    # Disjoint from storage.jsonl (no task's turns recur), so the suite still measures what the
    # gate's guard did not decide on.
    suite_turns = frozenset(tuple(t["content"] for t in row["turns"]) for row in suites["storage.jsonl"])
    guard = storage_suite(STORAGE_GUARD_SEED, "storage-guard", suite_turns)
    write_jsonl(GUARD, guard)
    # Storage traffic for the loop to learn from: disjoint from both the suite and the guard.
    guard_turns = frozenset(tuple(t["content"] for t in row["turns"]) for row in guard)
    write_jsonl(STORAGE_TRAIN, storage_suite(STORAGE_TRAIN_SEED, "storage-train", suite_turns | guard_turns,
                                             n=N_STORAGE_TRAIN))
    suite_questions = frozenset(row["question"] for row in suites["python.jsonl"])
    python_guard = python_suite(PYTHON_GUARD_SEED, "python-guard", suite_questions)
    write_jsonl(PYTHON_GUARD, python_guard)
    write_jsonl(PYTHON_TRAIN, python_suite(PYTHON_TRAIN_SEED, "python-train",
                                           suite_questions | {row["question"] for row in python_guard},
                                           rounds=N_PYTHON_TRAIN_ROUNDS))

    samples = {"asdiv-a-sample.jsonl": ("asdiv-a.jsonl", N_ASDIV, "asdiv-a"),
               "gsm8k-sample.jsonl": ("gsm8k-test.jsonl", N_GSM8K, "gsm8k")}
    for name, (src, n, kind) in samples.items():
        if (args.data_dir / src).is_file():
            write_jsonl(HERE / name, sample_file(args.data_dir / src, n, kind))
        else:
            print(f"skipping {name}: {args.data_dir / src} not found (keeping the committed file)")

    paths = [HERE / name for name in [*suites, *samples] if (HERE / name).is_file()] + [GUARD, STORAGE_TRAIN, PYTHON_GUARD, PYTHON_TRAIN]
    counts = validate(paths)
    for name, count in counts.items():
        print(f"{name}: {count} tasks")


if __name__ == "__main__":
    main()
