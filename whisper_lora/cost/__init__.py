"""Full fine-tuning vs LoRA: parameters, measured cost, projected GPU-hours and money."""
