"""From edit records to what editors take: edit requests and training examples."""

from __future__ import annotations

from editors import EditExample, EditRequest
from monitor.plan import GENERALITY, LOCALITY, planned
from simulator.records import EditRecord, VLKEBRecord
from simulator.stream import ImageRoot


def edit_request(record: EditRecord, images: ImageRoot) -> EditRequest:
    """The edit a record asks for: the reliability question of the probe plan (`src` about `image`), answered `alt`."""
    query = planned(record, "reliability", images.open).query
    return EditRequest(query.prompt, query.answer, query.image, record.pred, key=str(record.id))


def one_hop_request(record: VLKEBRecord, images: ImageRoot) -> EditRequest | None:
    """VLKEB Table 3's second edit (the one-hop fact of the new answer), if the record has one."""
    if record.port_edit_q is None or record.port_edit_a is None:
        return None
    return EditRequest(record.port_edit_q, record.port_edit_a, None, None, key=f"{record.id}/one-hop")


def edit_example(record: EditRecord, images: ImageRoot) -> EditExample:
    """A training example: the edit, its generality queries (must change) and its locality queries (must not),
    as the probe plan asks them."""
    generality = tuple(planned(record, metric, images.open).query for metric in GENERALITY)
    locality = tuple(planned(record, metric, images.open).query for metric in LOCALITY)
    return EditExample(edit_request(record, images), generality, locality)
