"""`python -m popo_cli ...`: the launch form torchrun needs (`torchrun --nproc-per-node 8 -m popo_cli train PRESET`)."""

from popo_cli.main import app

app()
