"""llama2.peft."""
