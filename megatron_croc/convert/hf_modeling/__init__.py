"""The model class shipped inside every HuggingFace export (``modeling_croc.py`` is copied into
the export folder and loaded with ``trust_remote_code=True``); it imports only transformers."""
