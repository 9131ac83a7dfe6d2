"""Model surgery that writes adapters: LoRA initialisation from weights, LoRA extraction."""
