"""Gradio demo over the runtime (no model code, no torch)."""
