"""Generator model, example construction, training engines and the training loop."""
