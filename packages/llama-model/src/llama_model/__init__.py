"""llama_model."""
