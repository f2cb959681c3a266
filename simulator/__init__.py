"""Simulator: record formats, the stream reader, the timeline, the synthetic world and the CLI."""

from simulator.records import (
    RECORD_FORMATS,
    EditRecord,
    EICRecord,
    EVQARecord,
    HopQA,
    Portability,
    RecordFormat,
    VLKEBRecord,
)
from simulator.stream import (
    ImageRoot,
    ImageRootError,
    RecordError,
    RecordsError,
    StreamReader,
    load_records,
    parse_record,
)

__all__ = [
    "RECORD_FORMATS",
    "EICRecord",
    "EVQARecord",
    "EditRecord",
    "HopQA",
    "ImageRoot",
    "ImageRootError",
    "Portability",
    "RecordError",
    "RecordFormat",
    "RecordsError",
    "StreamReader",
    "VLKEBRecord",
    "load_records",
    "parse_record",
]
