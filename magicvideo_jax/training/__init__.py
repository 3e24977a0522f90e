"""Training: the train state and step, and train_and_evaluate."""
