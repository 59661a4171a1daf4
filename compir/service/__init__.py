"""The HTTP API over the torch-free runtime (``compir serve``): FastAPI + uvicorn.

``create_app(ServiceEngine(retriever, config=ServiceConfig()))`` builds the app; ``cli.main``
runs it. Imports no torch, open_clip or gradio.
"""
