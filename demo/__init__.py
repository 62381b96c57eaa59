"""The web demo behind `app.py`: handlers and checkpoints (no Gradio) apart from each tab's layout (`demo.tabs`).

See `app.py`'s docstring for the map of modules.
"""
