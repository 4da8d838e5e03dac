"""llama2.metrics."""
