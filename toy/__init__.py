"""The embedded default: a tiny pretrained LLaVA, the shapes world, its held-out benchmark."""
