"""Model resolution (offline first) and loading with quantization and LoRA."""
