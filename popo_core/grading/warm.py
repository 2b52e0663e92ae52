"""Imported by the grading pool's forkserver (and nowhere else): one warm-up, so that every worker
forked from the server starts with math-verify's parsers built and sympy's lazy modules imported,
and a worker that replaces a killed one costs a fork rather than seconds of imports."""

import gc

from popo_core.grading.math_grader import warm_up

warm_up()
# Keep the garbage collector off the inherited objects: its passes write to every object it visits,
# which would make each forked worker copy the server's whole heap page by page.
gc.freeze()
