"""One training run: the loop, the update, log-probs of completions, the policy's companion networks, checkpoints, ranks and the memory plan."""
