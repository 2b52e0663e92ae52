"""The method: policy losses of POPO and its baselines, the siamese momentum network and penalty, and the objective binding them to `algo.*`."""
