"""Export trained models to TorchScript and score with them."""
