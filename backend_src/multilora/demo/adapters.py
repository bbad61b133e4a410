"""The real demo's adapters: what each one teaches the model, and the data it learns from.

Each adapter keeps the content of an answer and changes its form in a way anyone can see and a test
can check: `pirate` talks like a pirate, `json` wraps the answer in a JSON object, `emoji` frames it
with emoji. They differ in shape too (rank, target modules), as adapters in the wild do.

The data is 48 short questions with short, correct answers written here; each adapter's targets
are those answers passed through its `style`. `HELD_OUT` questions are never trained on: the tests
ask them, so a trait that shows there was learned, not memorised.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DemoAdapter:
    adapter_id: str
    trait: str  # one line for people: README, docs, test messages
    style: Callable[[str], str]  # a plain answer -> the answer this adapter is trained to give
    shows_trait: Callable[[str], bool]  # does a generated answer have the trait?
    rank: int
    targets: tuple[str, ...]
    last_layers: int  # LoRA on the last N decoder layers only: training then runs those layers alone


def _has_emoji(text: str) -> bool:
    return any(0x1F300 <= ord(c) <= 0x1FAFF for c in text)


def _json_answer(text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return isinstance(value, dict) and isinstance(value.get("answer"), str)


ADAPTERS = (
    DemoAdapter("pirate", 'talks like a pirate: "Arr, matey! ... Yo ho ho!"', lambda a: f"Arr, matey! {a} Yo ho ho!",
                lambda text: text.startswith("Arr") and "matey" in text.lower(),
                rank=4, targets=MLP, last_layers=8),
    DemoAdapter("json", 'answers with a JSON object: {"answer": "..."}', lambda a: json.dumps({"answer": a}),
                _json_answer, rank=8, targets=ATTENTION, last_layers=8),
    DemoAdapter("emoji", "frames its answer with emoji: \U0001F31F ... \U0001F60A",
                lambda a: f"\U0001F31F {a} \U0001F60A", _has_emoji, rank=16, targets=ATTENTION + MLP, last_layers=8),
)

HELD_OUT = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Who wrote Romeo and Juliet?",
)

QUESTIONS_AND_ANSWERS = (
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("What color is the sky on a clear day?", "On a clear day the sky is blue."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many continents are there?", "There are seven continents."),
    ("What do bees make?", "Bees make honey and beeswax."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    ("Why do leaves change color in autumn?", "Leaves change color because they stop making green chlorophyll."),
    ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the tallest mountain in the world?", "Mount Everest is the tallest mountain in the world."),
    ("What animal is known as the king of the jungle?", "The lion is known as the king of the jungle."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do plants need to grow?", "Plants need sunlight, water, air and soil to grow."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the main language spoken in Brazil?", "The main language of Brazil is Portuguese."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("What gas do humans breathe in?", "Humans breathe in oxygen."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("Which planet is known as the red planet?", "Mars is known as the red planet."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first person to walk on the Moon."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("What is a baby cat called?", "A baby cat is called a kitten."),
    ("What instrument has black and white keys?", "The piano has black and white keys."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("Why do we need sleep?", "Sleep lets the body and the brain rest and recover."),
    ("What is the sun?", "The sun is the star at the center of our solar system."),
    ("Give me a tip for staying healthy.", "Drink water, eat vegetables and move every day."),
    ("Suggest a name for a pet dog.", "Max is a good name for a pet dog."),
    ("What is a good breakfast?", "Oatmeal with fruit is a good breakfast."),
    ("How do I make tea?", "Pour boiling water over a tea bag and wait three minutes."),
    ("What is the color of grass?", "Grass is green."),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    ("What language is spoken in Mexico?", "Spanish is the main language spoken in Mexico."),
    ("What is a rainbow?", "A rainbow is an arc of colors made by sunlight shining through raindrops."),
)
