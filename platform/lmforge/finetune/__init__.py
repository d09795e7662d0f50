"""Fine-tuning: supervised chat data on top of a base model artifact."""
