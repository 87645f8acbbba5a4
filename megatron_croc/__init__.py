"""megatron_croc: Croc-style multimodal pretraining on megatron-core."""

__version__ = "0.1.0"
