"""whisper-lora: adapt OpenAI Whisper to low-resource languages with int8 + LoRA on Ray."""

__version__ = "0.1.0"
