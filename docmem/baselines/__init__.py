"""What a researcher would use instead of a keyed memory: LoRA adapters, the document in the prompt."""
