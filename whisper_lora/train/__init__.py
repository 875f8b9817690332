"""Training: precision choice, model + LoRA setup, the Ray Train worker loop, adapter checkpoints."""
