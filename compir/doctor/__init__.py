"""``compir doctor``: what this machine offers compir (Python and extras, CPU class, ``--amp auto``,
onnxruntime providers, GPU / driver / CUDA, TensorRT, JetPack, and an export's fastest variant).

Torch-free: torch is imported only to ask the training code what ``--amp auto`` picks, and only
where it is installed.
"""
