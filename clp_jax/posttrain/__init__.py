"""Post-training: supervised fine-tuning, generation and the cross-lingual transfer study."""
