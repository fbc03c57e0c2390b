"""nanopipe: train a small chat model end to end on one machine."""
