"""Prompt formats (kept free of heavy imports: the CLI reads them to build its help)."""

from typing import Literal

PromptFormat = Literal["auto", "chat", "plain"]

# VLKEB's prompt for every model ("Question: {} Short answer:"), with the family's image marker.
PLAIN_TEMPLATE = "{image}Question: {prompt} Short answer:"
