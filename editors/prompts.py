"""Prompt formats (kept free of heavy imports: the CLI reads them to build its help)."""

from typing import Literal

PromptFormat = Literal["auto", "chat", "plain", "vlkeb"]
ProtocolName = Literal["editwatch", "vlkeb"]  # benchmark protocols, defined in editors/protocols.py

# editwatch's plain prompt (MMEdit's E-VQA template, "Question: {} Short answer:"), with the family's image marker.
PLAIN_TEMPLATE = "{image}Question: {prompt} Short answer:"
# VLKEB's runs (its CaptionDataset) feed the bare "{question} {answer}", the image right after BOS on
# LLaVA (VLKEB: easyeditor/dataset/coco_caption.py collate_fn; trainer/llava/.../llava_llama.py);
# the family's `vlkeb_image_text` says where the image goes.
VLKEB_TEMPLATE = "{image}{prompt}"

# Memory-based editors (IKE, SERAC) state edits in the prompt; the embedded model is trained
# on exactly this wording, so it lives here, once.
IN_CONTEXT_FACT = "New fact: {prompt} {answer}."
IN_CONTEXT_PROMPT = "Prompt: {prompt}"


def in_context_prompt(facts: list[tuple[str, str]], prompt: str) -> str:
    """A prompt carrying edits as "New fact: Q A." statements before the question."""
    stated = [IN_CONTEXT_FACT.format(prompt=q, answer=a) for q, a in facts]
    return " ".join([*stated, IN_CONTEXT_PROMPT.format(prompt=prompt)])
