"""The Gradio demo (``compir demo``) over the torch-free runtime: no model code, no torch.

``session.py`` holds what the page does (testable without a UI), ``app.py`` the page,
``examples.py`` the one-click example queries, ``launch.py`` / ``cli.py`` start it on 127.0.0.1.
"""
