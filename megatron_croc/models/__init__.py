"""The Croc model, built from megatron-core modules."""
