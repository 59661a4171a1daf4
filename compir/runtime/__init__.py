"""Torch-free runtime: preprocessing, tokenizer, onnxruntime / TensorRT backends, usearch index,
:class:`Retriever`. Never imports torch, open_clip or gradio (a test proves it)."""
