"""The Ray Tune sweep: languages × LoRA ranks × learning rates, selection and publication."""
