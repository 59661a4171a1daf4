"""TensorRT engines from an export folder's ONNX graphs (``compir export engine``).

``tensorrt`` is imported only inside the functions that build; profile computation
(:mod:`.profiles`) is plain Python so it is tested without a GPU.
"""
