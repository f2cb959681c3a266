"""The vocabulary of the synthetic world: relations, their question templates and hop chains.

Creatures are anonymous visual identities (a rendered glyph); what is known about them is
four image relations whose values are text entities. Text entities are linked by text
relations, so every image fact starts a chain of up to four further hops:

    creature --home--> city --country--> country --language--> language --script--> script --era--> era
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TextRelation:
    """A fact about a text entity: `subject` kind -> `object` kind, asked with `templates`."""

    name: str
    subject: str
    object: str
    templates: tuple[str, ...]  # "{x}" is the subject


@dataclass(frozen=True)
class ImageRelation:
    """A fact about the creature in the image, and the text chain its value starts."""

    name: str
    object: str
    templates: tuple[str, ...]  # asked about the image; the first two are src / rephrase
    chain: tuple[str, ...]  # text relations followed from the value, hop 1..4
    hop_questions: tuple[str, ...]  # question of hop k at index k - 1


TEXT_RELATIONS = {
    r.name: r
    for r in (
        TextRelation("country", "city", "country", ("In which country is the city of {x}?", "{x} is a city in which country?")),
        TextRelation("language", "country", "language", ("What language is spoken in {x}?", "Which language do people in {x} speak?")),
        TextRelation("script", "language", "script", ("Which script is {x} written in?", "{x} is written in which script?")),
        TextRelation("era", "script", "era", ("From which era is the {x} script?", "The {x} script dates from which era?")),
        TextRelation("origin", "food", "country", ("Which country does {x} come from?", "{x} originates from which country?")),
        TextRelation("birthplace", "person", "city", ("In which city was {x} born?", "{x} was born in which city?")),
        TextRelation("maker", "toy", "person", ("Who made the {x}?", "The {x} was made by whom?")),
    )
}

IMAGE_RELATIONS = {
    r.name: r
    for r in (
        ImageRelation(
            "home", "city",
            ("Where does the creature in the image live?", "Which city is home to the creature in the image?",
             "In what city does this creature live?"),
            ("country", "language", "script", "era"),
            ("In which country does the creature in the image live?",
             "Which language is spoken where the creature in the image lives?",
             "Which script writes the language spoken where the creature in the image lives?",
             "From which era is the script of the language spoken where the creature in the image lives?"),
        ),
        ImageRelation(
            "food", "food",
            ("What does the creature in the image eat?", "Which food does the creature in the image like?",
             "What is the favourite food of this creature?"),
            ("origin", "language", "script", "era"),
            ("Which country does the food of the creature in the image come from?",
             "Which language is spoken where the food of the creature in the image comes from?",
             "Which script writes the language of the country the food of the creature in the image comes from?",
             "From which era is the script of the language of the country the food of the creature in the image comes from?"),
        ),
        ImageRelation(
            "keeper", "person",
            ("Who keeps the creature in the image?", "Who is the keeper of the creature in the image?",
             "Which person looks after this creature?"),
            ("birthplace", "country", "language", "script"),
            ("In which city was the keeper of the creature in the image born?",
             "In which country was the keeper of the creature in the image born?",
             "Which language is spoken where the keeper of the creature in the image was born?",
             "Which script writes the language spoken where the keeper of the creature in the image was born?"),
        ),
        ImageRelation(
            "toy", "toy",
            ("Which toy does the creature in the image play with?", "What toy belongs to the creature in the image?",
             "What does this creature play with?"),
            ("maker", "birthplace", "country", "language"),
            ("Who made the toy of the creature in the image?",
             "In which city was the maker of the toy of the creature in the image born?",
             "In which country was the maker of the toy of the creature in the image born?",
             "Which language is spoken where the maker of the toy of the creature in the image was born?"),
        ),
    )
}

# Templates and renders the default model trains on; the rest are held out and reported.
TRAINED_TEMPLATES = 2
TRAINED_RENDERS = 2
RENDERS = 3
