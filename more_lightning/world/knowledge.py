"""The embedded world's knowledge base: made-up people, where they live, their job, their fruit.

Text-only facts the tiny LLaVA memorises during pretraining and the benchmarks use for text
locality (``loc`` / ``loc_ans``, the role NQ plays in MMEdit). Entity names are invented
two-syllable words (one token each); every answer is one word. Each relation has three question
templates, so a fact can be asked in paraphrase. Deterministic from ``seed``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_VOWELS = ("a", "e", "i", "o", "u")
_CODAS = ("", "n", "r", "l", "x")

CITIES: tuple[str, ...] = (
    "arbel", "brisk", "colmar", "dunhal", "esker", "fennic", "gorlan", "harrow",
    "ilmar", "jostin", "kessel", "lorwick", "mirth", "norvel", "osmar", "pellin",
)  # fmt: skip
JOBS: tuple[str, ...] = (
    "baker", "pilot", "farmer", "doctor", "painter", "sailor", "teacher", "miner",
    "tailor", "singer", "hunter", "writer",
)  # fmt: skip
FRUITS: tuple[str, ...] = (
    "apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "peach",
    "pear", "plum",
)  # fmt: skip
#: relation -> (answer vocabulary, question templates with ``{e}`` = the entity).
RELATIONS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "city": (
        CITIES,
        ("where does {e} live?", "in which city does {e} live?", "what is the home city of {e}?"),
    ),
    "job": (
        JOBS,
        ("what does {e} do for a living?", "what is the job of {e}?", "what work does {e} do?"),
    ),
    "fruit": (
        FRUITS,
        ("what is the favourite fruit of {e}?", "which fruit does {e} like best?", "what fruit does {e} love?"),
    ),
}


@dataclass(frozen=True)
class Fact:
    entity: str
    relation: str
    answer: str

    def question(self, template: int = 0) -> str:
        templates = RELATIONS[self.relation][1]
        return templates[template % len(templates)].format(e=self.entity)


def entity_names(n: int, rng: random.Random, reserved: set[str] = frozenset()) -> list[str]:
    """``n`` distinct invented names (onset-vowel-onset-vowel-coda), none in ``reserved``."""
    names: list[str] = []
    seen = set(reserved)
    while len(names) < n:
        name = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_ONSETS) + rng.choice(_VOWELS)
        name += rng.choice(_CODAS)
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def build_knowledge(num_entities: int = 200, seed: int = 0) -> list[Fact]:
    """All facts: every entity has one answer per relation, drawn uniformly."""
    rng = random.Random(seed)
    reserved = set(CITIES) | set(JOBS) | set(FRUITS)
    facts = []
    for entity in entity_names(num_entities, rng, reserved):
        for relation, (answers, _) in RELATIONS.items():
            facts.append(Fact(entity, relation, rng.choice(answers)))
    return facts


def knowledge_words(facts: list[Fact]) -> set[str]:
    """Every word the knowledge base's questions and answers use (for the tokenizer)."""
    words = {f.entity for f in facts} | set(CITIES) | set(JOBS) | set(FRUITS)
    for _, templates in RELATIONS.values():
        for t in templates:
            words.update(t.replace("{e}", "").replace("?", " ").split())
    return words
