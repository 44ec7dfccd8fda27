"""understudy: LLM serving that survives engine crashes in milliseconds."""

__version__ = "0.1.0"
