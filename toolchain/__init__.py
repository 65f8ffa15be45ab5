"""toolchain: config-driven compile-and-export builds for Hugging Face transformer models."""
__version__ = "0.1.0"
