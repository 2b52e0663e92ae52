"""Verifiers: reward functions over responses, the math grader (math-verify in worker processes), and its audit."""
