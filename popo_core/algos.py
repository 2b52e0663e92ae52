"""The public loss API, kept under its historical name: `popo_core.algos.policy_loss(name, **knobs)`,
`popo_loss`, `grpo_loss` and the rest of the family. The losses live in `popo_core.algo.losses`;
external checks (and tests/algo/test_vs_trl.py) import them from here."""
from popo_core.algo.losses import *  # noqa: F401,F403  (the one re-export: the public loss API)
from popo_core.algo.losses import __all__  # noqa: F401
