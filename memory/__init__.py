"""Memory: vector stores of edits for memory-based editors (FAISS-backed; see DESIGN.md).

Imports nothing of ours. Embedders that need a model from `editors/` (the LVLM's vision tower)
are built there and handed in through the `ImageEmbedder` protocol.
"""

from memory.embedders import Embedder, ImageEmbedder, MultimodalKeys, TextEmbedder
from memory.index import IndexPlan, MemoryConfig
from memory.journal import Change, JournalError, JournalPosition, MemoryJournal, read_journal
from memory.lock import ReadWriteLock
from memory.stats import LATENCY_BUCKETS, RetrievalStats, StatsSnapshot
from memory.store import MemoryInputError, SearchResult, VectorMemory

__all__ = [
    "LATENCY_BUCKETS",
    "Change",
    "JournalError",
    "JournalPosition",
    "MemoryJournal",
    "Embedder",
    "ImageEmbedder",
    "IndexPlan",
    "MemoryConfig",
    "MemoryInputError",
    "MultimodalKeys",
    "ReadWriteLock",
    "RetrievalStats",
    "SearchResult",
    "StatsSnapshot",
    "TextEmbedder",
    "VectorMemory",
    "read_journal",
]
