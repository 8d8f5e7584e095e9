"""`lorakit serve`: an OpenAI-compatible server for a base model and many adapters, batched together."""
