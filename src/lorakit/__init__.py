"""lorakit: fine-tune language models on the machine you have."""

__version__ = "0.1.0"
