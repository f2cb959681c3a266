"""Memory: vector stores of edits for memory-based editors (FAISS-backed; see DESIGN.md)."""
