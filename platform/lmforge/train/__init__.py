"""Pretraining on Ray Train with FSDP2. Submodules import lazily: `parallelize` needs only torch."""
