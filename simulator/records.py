"""Edit record formats: VLKEB eval records and MMEdit E-VQA / E-IC records (DESIGN.md, Data).

This is the only home of the record schema. Field names follow the published JSON files.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, model_validator

Text = Annotated[str, StringConstraints(min_length=1)]
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


class EditRecord(BaseModel):
    """The fields every format shares (MMEdit's E-VQA record); `id`/`t` come from the stream."""

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
    """VLKEB eval record: multi-hop portability, or the `edit_onehop` variant (Table 3)."""

    port_new: list[Portability] = Field(default_factory=list, description="1- to 4-hop portability tests")
    port_base: list[Portability] = Field(
        default_factory=list,
        description="editwatch extension: the port_new questions answered with the original facts",
    )
    port_q: Text | None = Field(None, description="edit_onehop: portability question after both edits")
    port_a: Text | None = Field(None, description="edit_onehop: its answer")
    port_edit_q: Text | None = Field(None, description="edit_onehop: the one-hop fact edited second")
    port_edit_a: Text | None = Field(None, description="edit_onehop: the one-hop fact's new answer")

    @model_validator(mode="after")
    def _onehop_complete(self) -> VLKEBRecord:
        fields = ("port_q", "port_a", "port_edit_q", "port_edit_a")
        present = [f for f in fields if getattr(self, f) is not None]
        if present and len(present) != len(fields):
            missing = ", ".join(f for f in fields if f not in present)
            raise ValueError(f"edit_onehop records need all of {', '.join(fields)}; missing {missing}")
        return self

    def hop(self, hops: int) -> HopQA | None:
        """The first portability test with `hops` hops, if the record has one."""
        return next((p.qa for p in self.port_new if p.hops == hops), None)

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


RECORD_FORMATS: dict[str, type[EditRecord]] = {"vlkeb": VLKEBRecord, "evqa": EVQARecord, "eic": EICRecord}
RecordFormat = Literal["vlkeb", "evqa", "eic"]
