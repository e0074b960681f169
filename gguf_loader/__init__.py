"""Everything about a model file: GGUF inspection, the bundled default model, the llama.cpp engine.

Importing this package needs no llama.cpp: the engine is imported on its own (gguf_loader.engine)."""
from .inspect import GGUFError, ModelInfo, inspect

__all__ = ["GGUFError", "ModelInfo", "inspect"]
