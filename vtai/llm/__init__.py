"""Models, token counts, provider errors and the local model."""
