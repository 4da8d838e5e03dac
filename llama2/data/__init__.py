"""llama2.data."""
