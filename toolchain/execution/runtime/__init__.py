"""Heavy helpers (torch, transformers, onnxruntime). Imported only inside worker processes."""
