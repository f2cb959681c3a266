"""Edit record formats: VLKEB eval records and MMEdit E-VQA / E-IC records (DESIGN.md, Data).

This is the only home of the record schema. Field names follow the published JSON files.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    model_validator,
)

def _not_blank(value: str) -> str:
    # A blank question or answer has no tokens to score: refused here, so the line is quarantined
    # instead of failing the run when the model meets it.
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, StringConstraints(min_length=1), AfterValidator(_not_blank)]
HOPS = ("1-hop", "2-hop", "3-hop", "4-hop")


def _relative_image_path(value: str) -> str:
    # Checked here without the root so that every loader rejects escapes; the image root
    # check (symlinks included) happens when the path is resolved.
    path = PurePosixPath(value.replace("\\", "/"))
    if not value or path.is_absolute() or ".." in path.parts:
        raise ValueError(f"image path {value!r} must be relative and stay inside the image root")
    return value


ImagePath = Annotated[str, StringConstraints(min_length=1), AfterValidator(_relative_image_path)]
RecordId = Annotated[str, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)]


class HopQA(BaseModel):
    """A portability question and its answer (VLKEB's `Q&A` object)."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    question: Text = Field(alias="Question")
    answer: Text = Field(alias="Answer")


class Portability(BaseModel):
    """One k-hop portability test of a VLKEB record."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    port_type: Literal["1-hop", "2-hop", "3-hop", "4-hop"]
    qa: HopQA = Field(alias="Q&A")

    @property
    def hops(self) -> int:
        """Number of hops, 1..4."""
        return HOPS.index(self.port_type) + 1


class OneHopEdit(BaseModel):
    """A `port_new` item of VLKEB's `edit_onehop` files (Table 3): edit the one-hop fact too, then ask.

    VLKEB's edit_onehop loader (easyeditor/dataset/coco_caption.py on its `edit_onehop` branch)
    reads exactly these four keys per item, and its trainer allows one item per record.
    """

    model_config = ConfigDict(frozen=True)

    port_q: Text = Field(description="portability question asked after both edits")
    port_a: Text = Field(description="its answer")
    port_edit_q: Text = Field(description="the one-hop fact of the new answer, edited second")
    port_edit_a: Text = Field(description="the one-hop fact's new answer")


ONE_HOP_KEYS = ("port_q", "port_a", "port_edit_q", "port_edit_a")
# Tags of the port_new union; pydantic puts them in error locations, readers leave them out.
PORT_TAGS = frozenset({"multi-hop", "edit_onehop"})


def _port_layout(value: Any) -> str | None:
    """Which of VLKEB's two `port_new` layouts an item follows (None: neither)."""
    if isinstance(value, BaseModel):
        return "edit_onehop" if isinstance(value, OneHopEdit) else "multi-hop"
    if not isinstance(value, dict):
        return None
    if "port_type" in value or "Q&A" in value:
        return "multi-hop"
    return "edit_onehop" if any(key in value for key in ONE_HOP_KEYS) else None


PortItem = Annotated[
    Union[Annotated[Portability, Tag("multi-hop")], Annotated[OneHopEdit, Tag("edit_onehop")]],
    Discriminator(
        _port_layout,
        custom_error_type="port_layout",
        custom_error_message="a port_new item needs port_type and Q&A (multi-hop) or port_q, port_a, "
        "port_edit_q and port_edit_a (edit_onehop)",
    ),
]


class EditRecord(BaseModel):
    """The fields every format shares (MMEdit's E-VQA record); `id`/`t` come from the stream.

    Keys no format knows are ignored here; readers report them (`unknown_fields`), and keys of
    another format are refused (`foreign_fields`), so that no field is dropped silently.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: RecordId | None = Field(None, description="stable edit id; the line number when absent")
    t: float | str | None = Field(None, description="timestamp of the edit in the timeline")
    src: Text = Field(description="edit question about `image`")
    alt: Text = Field(description="new answer the edit installs")
    pred: str | None = Field(None, description="old answer (what the model said before)")
    rephrase: Text = Field(description="paraphrase of `src` (text generality)")
    image: ImagePath = Field(description="image of the edit, relative to the image root")
    image_rephrase: ImagePath = Field(description="another image of the same subject (image generality)")
    loc: Text = Field(description="unrelated text-only question (text locality)")
    loc_ans: Text = Field(description="answer to `loc`")
    m_loc: ImagePath = Field(description="unrelated image (multimodal locality)")
    m_loc_q: Text = Field(description="question about `m_loc`")
    m_loc_a: Text = Field(description="answer to `m_loc_q`")

    @property
    def image_fields(self) -> dict[str, str]:
        """Every image path of the record by field name."""
        return {"image": self.image, "image_rephrase": self.image_rephrase, "m_loc": self.m_loc}

    def hop(self, hops: int) -> HopQA | None:
        """The portability test with `hops` hops; MMEdit records have none."""
        return None

    def base_hop(self, hops: int) -> HopQA | None:
        """The hop question answered with the original facts, for the unedited model's portability."""
        return None

    def one_hop(self) -> HopQA | None:
        """VLKEB Table 3's portability test after also editing the one-hop fact; MMEdit records have none."""
        return None


class EVQARecord(EditRecord):
    """MMEdit editing-VQA record."""


class EICRecord(EditRecord):
    """MMEdit editing-image-caption record (`src` is the caption prompt, `alt` the caption)."""


class VLKEBRecord(EditRecord):
    """VLKEB eval record: multi-hop portability, or the `edit_onehop` variant (Table 3).

    VLKEB publishes the one-hop test as a `port_new` item; editwatch's synthetic world writes
    the same four keys at the top level beside multi-hop `port_new` items. Both parse, and the
    properties `port_q` .. `port_edit_a` read whichever the record holds.
    """

    port_new: list[PortItem] = Field(
        default_factory=list, description="1- to 4-hop portability tests, or VLKEB's edit_onehop item"
    )
    port_base: list[Portability] = Field(
        default_factory=list,
        description="editwatch extension: the port_new questions answered with the original facts",
    )
    top_port_q: Text | None = Field(None, alias="port_q", description="edit_onehop at top level: the question")
    top_port_a: Text | None = Field(None, alias="port_a", description="edit_onehop at top level: its answer")
    top_port_edit_q: Text | None = Field(
        None, alias="port_edit_q", description="edit_onehop at top level: the one-hop fact edited second"
    )
    top_port_edit_a: Text | None = Field(
        None, alias="port_edit_a", description="edit_onehop at top level: the one-hop fact's new answer"
    )

    @model_validator(mode="after")
    def _onehop_complete(self) -> VLKEBRecord:
        top = {key: getattr(self, f"top_{key}") for key in ONE_HOP_KEYS}
        present = [key for key, value in top.items() if value is not None]
        if present and len(present) != len(ONE_HOP_KEYS):
            missing = ", ".join(key for key in ONE_HOP_KEYS if key not in present)
            raise ValueError(f"edit_onehop records need all of {', '.join(ONE_HOP_KEYS)}; missing {missing}")
        items = [p for p in self.port_new if isinstance(p, OneHopEdit)]
        if len(items) > 1:
            raise ValueError(f"an edit_onehop record holds one one-hop edit (as VLKEB's), port_new holds {len(items)}")
        if items and present:
            raise ValueError("the one-hop test is given twice: in port_new and at the top level; keep one")
        return self

    @property
    def _one_hop_item(self) -> OneHopEdit | None:
        return next((p for p in self.port_new if isinstance(p, OneHopEdit)), None)

    @property
    def port_q(self) -> str | None:
        """edit_onehop: the portability question asked after both edits."""
        item = self._one_hop_item
        return item.port_q if item else self.top_port_q

    @property
    def port_a(self) -> str | None:
        """edit_onehop: its answer."""
        item = self._one_hop_item
        return item.port_a if item else self.top_port_a

    @property
    def port_edit_q(self) -> str | None:
        """edit_onehop: the one-hop fact of the new answer, edited second."""
        item = self._one_hop_item
        return item.port_edit_q if item else self.top_port_edit_q

    @property
    def port_edit_a(self) -> str | None:
        """edit_onehop: the one-hop fact's new answer."""
        item = self._one_hop_item
        return item.port_edit_a if item else self.top_port_edit_a

    @property
    def hop_tests(self) -> list[Portability]:
        """The multi-hop items of `port_new`."""
        return [p for p in self.port_new if isinstance(p, Portability)]

    def hop(self, hops: int) -> HopQA | None:
        """The first portability test with `hops` hops, if the record has one."""
        return next((p.qa for p in self.hop_tests if p.hops == hops), None)

    def one_hop(self) -> HopQA | None:
        """`port_q` / `port_a` of an edit_onehop record."""
        if self.port_q is None or self.port_a is None:
            return None
        return HopQA(Question=self.port_q, Answer=self.port_a)

    def base_hop(self, hops: int) -> HopQA | None:
        """`port_base`'s hop when the record has one; else VLKEB's base test, the `port_new` hop."""
        if self.port_base:
            return next((p.qa for p in self.port_base if p.hops == hops), None)
        return self.hop(hops)


class Retraction(BaseModel):
    """A stream line that undoes an earlier edit: `{"op": "retract", "id": ...}` names the edit by its id."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    op: Literal["retract"] = Field(description="the operation; `retract` is the only one")
    id: RecordId = Field(description="id of the earlier edit to undo")
    t: float | str | None = Field(None, description="timestamp of the retraction in the timeline")


RECORD_FORMATS: dict[str, type[EditRecord]] = {"vlkeb": VLKEBRecord, "evqa": EVQARecord, "eic": EICRecord}
RecordFormat = Literal["vlkeb", "evqa", "eic"]


def _keys(model: type[BaseModel]) -> frozenset[str]:
    """The JSON keys a record model reads (aliases where declared)."""
    return frozenset(field.alias or name for name, field in model.model_fields.items())


def foreign_fields(data: dict[str, Any], record_format: RecordFormat) -> dict[str, str]:
    """Keys of `data` that only another format reads, each with that format's name.

    `--format evqa` on a VLKEB record would otherwise drop its portability tests without a word.
    """
    own = _keys(RECORD_FORMATS[record_format])
    owners = {}
    for name, model in RECORD_FORMATS.items():
        for key in _keys(model) - own:
            owners.setdefault(key, name)
    return {key: owners[key] for key in data if key in owners}


_PORT_ITEM_KEYS = frozenset({"port_type", "Q&A", *ONE_HOP_KEYS})


def unknown_fields(data: dict[str, Any], record_format: RecordFormat) -> list[str]:
    """Keys of `data` (and of its `port_new` items, as `port_new[].key`) that no format reads.

    Published files carry such metadata (ids, sources, categories): it is reported, not refused.
    """
    known = frozenset().union(*map(_keys, RECORD_FORMATS.values()))
    unknown = [key for key in data if key not in known]
    items = data.get("port_new") if record_format == "vlkeb" else None
    for item in items if isinstance(items, list) else ():
        if isinstance(item, dict):
            unknown += [f"port_new[].{key}" for key in item if key not in _PORT_ITEM_KEYS]
    return list(dict.fromkeys(unknown))
