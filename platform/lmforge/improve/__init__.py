"""The continuous-improvement loop: feedback -> SFT data -> fine-tune -> gate -> promote."""
