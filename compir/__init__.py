"""compir: composed image retrieval, from training to a torch-free edge runtime.

Stages are subpackages (``train``, ``export``, ``runtime``, ``demo``); the modules beside
them (``contracts``, ``manifest``, ``images``, ``data``, ``metrics``) are shared by all stages
and import nothing heavier than numpy and Pillow.
"""

__version__ = "0.1.0"
