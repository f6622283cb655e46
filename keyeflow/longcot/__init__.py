"""LongCoT cold-start data (SPEC §4.3.1), its own layer between quality and training."""
