"""The self-contained MunbaPipeline file (also copied into every erased model folder)."""
