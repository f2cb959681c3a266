"""A record's probe plan: which question, answer and image every metric asks — the only such mapping.

DESIGN.md, Metrics: reliability asks `src` about `image` for `alt`; T-Gen swaps the question for
`rephrase`, I-Gen the image for `image_rephrase`; T-Loc / I-Loc ask the record's locality
questions; k-hop portability asks the hop question about `image`. The base plan asks what the
unedited model knew: the original answer `pred`, the locality answers and the original hop facts.
Everything that turns a record into queries (the timeline, probe rounds, training examples)
reads these tables, so a metric's question is written once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from PIL import Image

from editors import Query

HOP_RANGE = range(1, 5)
PORTABILITY = tuple(f"port_{k}hop" for k in HOP_RANGE)
ImageOpener = Callable[[str], Image.Image]


@dataclass(frozen=True)
class Ask:
    """Which record fields a metric's query is made of: the question, the answer and the image (None: text only)."""

    question: str
    answer: str
    image: str | None


EDIT_PLAN: dict[str, Ask] = {
    "reliability": Ask("src", "alt", "image"),
    "t_gen": Ask("rephrase", "alt", "image"),
    "i_gen": Ask("src", "alt", "image_rephrase"),
    "t_loc": Ask("loc", "loc_ans", None),
    "i_loc": Ask("m_loc_q", "m_loc_a", "m_loc"),
}
BASE_PLAN: dict[str, Ask] = {
    "pred_src": Ask("src", "pred", "image"),
    "pred_rephrase": Ask("rephrase", "pred", "image"),
    "pred_image_rephrase": Ask("src", "pred", "image_rephrase"),
    "loc": Ask("loc", "loc_ans", None),
    "m_loc": Ask("m_loc_q", "m_loc_a", "m_loc"),
}
GENERALITY = ("t_gen", "i_gen")  # queries an edit must change: its training generality set, retrieval's in-scope
LOCALITY = ("t_loc", "i_loc")  # queries an edit must not change


class HopFacts(Protocol):
    """A portability question and answer."""

    question: str
    answer: str


class EditFacts(Protocol):
    """The fields of an edit record that the plan reads (the schema itself is simulator's)."""

    src: str
    alt: str
    pred: str | None
    rephrase: str
    image: str
    image_rephrase: str
    loc: str
    loc_ans: str
    m_loc: str
    m_loc_q: str
    m_loc_a: str

    def hop(self, hops: int) -> HopFacts | None: ...

    def one_hop(self) -> HopFacts | None: ...

    def base_hop(self, hops: int) -> HopFacts | None: ...


@dataclass(frozen=True)
class Probe:
    """One query feeding one metric; `key` identifies its content (for cached references), `image` names its file."""

    metric: str
    query: Query
    key: str
    image: str | None = None


def make_probe(metric: str, question: str, answer: str, image: str | None, open_image: ImageOpener) -> Probe:
    """A probe of `metric`; its key hashes the image name, question and answer."""
    key = hashlib.sha1("\x1f".join([image or "", question, answer]).encode()).hexdigest()
    return Probe(metric, Query(question, answer, open_image(image) if image else None), key, image)


def planned(edit: Any, metric: str, open_image: ImageOpener, plan: dict[str, Ask] = EDIT_PLAN,
            answer: str | None = None) -> Probe:
    """The probe `plan` asks for `metric`, read from `edit`'s fields (a record, or anything with those fields);
    `answer` replaces the planned answer (e.g. an older value of the fact)."""
    ask = plan[metric]
    image = getattr(edit, ask.image) if ask.image else None
    answer = getattr(edit, ask.answer) if answer is None else answer
    return make_probe(metric, getattr(edit, ask.question), answer, image, open_image)


def edit_probes(edit: EditFacts, open_image: ImageOpener, one_hop: bool = False) -> list[Probe]:
    """The queries of every post-edit metric of one edit; `one_hop` adds VLKEB Table 3's `port_onehop`."""
    probes = [planned(edit, metric, open_image) for metric in EDIT_PLAN]
    for k in HOP_RANGE:
        if (qa := edit.hop(k)) is not None:
            probes.append(make_probe(f"port_{k}hop", qa.question, qa.answer, edit.image, open_image))
    if one_hop and (qa := edit.one_hop()) is not None:
        probes.append(make_probe("port_onehop", qa.question, qa.answer, edit.image, open_image))
    return probes


def base_probes(edit: EditFacts, open_image: ImageOpener) -> list[Probe]:
    """What the unedited model knows: `pred` on src / rephrase / image_rephrase, loc, m_loc, and
    the hop questions answered with the original facts (`base_hop`)."""
    metrics = [m for m in BASE_PLAN if edit.pred or not m.startswith("pred_")]
    probes = [planned(edit, metric, open_image, BASE_PLAN) for metric in metrics]
    for k in HOP_RANGE:
        if (qa := edit.base_hop(k)) is not None:
            probes.append(make_probe(f"port_{k}hop", qa.question, qa.answer, edit.image, open_image))
    return probes
