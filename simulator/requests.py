"""From edit records to what editors take: edit requests and training examples."""

from __future__ import annotations

from editors import EditExample, EditRequest, Query
from simulator.records import EditRecord, VLKEBRecord
from simulator.stream import ImageRoot


def edit_request(record: EditRecord, images: ImageRoot) -> EditRequest:
    """The edit a record asks for: answer `alt` to `src` about `image`."""
    return EditRequest(record.src, record.alt, images.open(record.image), record.pred, key=str(record.id))


def one_hop_request(record: VLKEBRecord, images: ImageRoot) -> EditRequest | None:
    """VLKEB Table 3's second edit (the one-hop fact of the new answer), if the record has one."""
    if record.port_edit_q is None or record.port_edit_a is None:
        return None
    return EditRequest(record.port_edit_q, record.port_edit_a, None, None, key=f"{record.id}/one-hop")


def edit_example(record: EditRecord, images: ImageRoot) -> EditExample:
    """A training example: the edit, its rephrasings (must change) and its locality queries (must not)."""
    edit = edit_request(record, images)
    generality = (
        Query(record.rephrase, record.alt, edit.image),
        Query(record.src, record.alt, images.open(record.image_rephrase)),
    )
    locality = (
        Query(record.loc, record.loc_ans),
        Query(record.m_loc_q, record.m_loc_a, images.open(record.m_loc)),
    )
    return EditExample(edit, generality, locality)
