"""Answer regeneration: the target answers every prompt, locally or through OpenAI-compatible servers."""
