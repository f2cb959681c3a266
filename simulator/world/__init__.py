"""The synthetic multimodal world and the embedded default model trained on it."""
