"""Translation between API dialects (KoboldCpp native, OpenAI, Ollama) and the engine. Pure functions, no HTTP."""
