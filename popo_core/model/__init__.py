"""Models and tokenizers: loading from the Hub or a local path, the locally built tiny pair, and the warm start."""
