"""The warm start: what its hash covers, the SFT loss and schedule, the cache (build once, reuse, atomic)."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from popo_core.model import warmstart
from popo_core.config import ModelConfig, compose
from popo_core.errors import ModelLoadError
from popo_core.model.loading import build_tiny_model, build_tiny_tokenizer, load_model_and_tokenizer

SMALL = ["model.name_or_path=warmstart", "model.hidden_size=64", "model.num_layers=1", "model.num_heads=2", "warmstart.steps=3",
         "warmstart.batch_size=4", "warmstart.warmup_steps=1", "data.train_size=50", "data.eval_size=5",
         "model.bench_max_new_tokens=8"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on shared 2-core machines: one thread (PITFALLS.md)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "warmstart"


def test_hash_covers_what_determines_the_model_and_nothing_else(monkeypatch):
    recipe = "model.name_or_path=warmstart"
    base = warmstart.spec_hash(compose("arith", [recipe]))
    for override in ("data.seed=1", "data.max_terms=6", "data.max_operand=8", "model.hidden_size=256",
                     "model.num_layers=3", "warmstart.lr=1e-3", "warmstart.seed=1", "warmstart.steps=10"):
        assert warmstart.spec_hash(compose("arith", [recipe, override])) != base, override
    for override in ("trainer.seed=3", "algo=grpo", "optim.lr=1e-4", "rollout.group_size=4", "trainer.max_steps=5",
                     "model.bench_max_new_tokens=10", "data.train_size=4000", "data.eval_size=100"):
        assert warmstart.spec_hash(compose("arith", [recipe, override])) == base, override
    monkeypatch.setattr(warmstart, "CODE_VERSION", warmstart.CODE_VERSION + 1)
    assert warmstart.spec_hash(compose("arith")) != base
    monkeypatch.undo()
    assert warmstart.spec_hash(compose("arith")) == base
    # the libraries' floating-point paths change the weights: their versions are in the key
    monkeypatch.setattr(warmstart, "build_versions", lambda: {"torch": "0.0", "transformers": "0.0"})
    assert warmstart.spec_hash(compose("arith")) != base


def test_cache_dir_is_popo_cache_or_home(monkeypatch, tmp_path):
    monkeypatch.setenv("POPO_CACHE", str(tmp_path))
    assert warmstart.cache_root() == tmp_path / "warmstart"
    monkeypatch.delenv("POPO_CACHE")
    assert warmstart.cache_root() == Path.home() / ".cache" / "popo" / "warmstart"


def test_lr_schedule_warms_up_then_decays_to_zero():
    w = compose("arith", ["model.name_or_path=warmstart", "warmstart.steps=100", "warmstart.warmup_steps=10", "warmstart.lr=0.01"]).warmstart
    expected = [0.01 * s / 10 if s <= 10 else 0.005 * (1 + math.cos(math.pi * (s - 10) / 90)) for s in range(1, 101)]
    got = [warmstart.lr_at(s, w) for s in range(1, 101)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert got[9] == pytest.approx(0.01) and got[-1] == pytest.approx(0.0, abs=1e-15)


def test_sft_batch_masks_the_prompt_and_padding():
    tok = build_tiny_tokenizer()
    ids, mask, labels = warmstart.sft_batch(tok, [("3+4=", "3+4=7"), ("1+2+3=", "1+2=3,3+3=6")])
    assert ids.shape == mask.shape == labels.shape == (2, 6 + 11 + 1)
    for row, (p, c) in enumerate([("3+4=", "3+4=7"), ("1+2+3=", "1+2=3,3+3=6")]):
        n = int(mask[row].sum())
        assert tok.decode(ids[row, :n]) == p + c + tok.eos_token
        assert (labels[row, : len(p)] == -100).all() and (labels[row, n:] == -100).all()
        assert labels[row, len(p) : n].tolist() == ids[row, len(p) : n].tolist()
        assert labels[row, n - 1] == tok.eos_token_id


def test_sft_loss_and_gradient_match_a_float64_cross_entropy_over_completion_tokens():
    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, seed=3)
    ids, mask, labels = warmstart.sft_batch(tok, [("3+4=", "3+4=7"), ("1+2+3=", "1+2=3,3+3=6"), ("9+9=", "x")])
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(input_ids=ids, attention_mask=mask).logits.double()
    # Token t is predicted at position t - 1; the mean over every labelled token.
    logp = torch.log_softmax(logits[:, :-1], -1)
    target = labels[:, 1:]
    keep = target != -100
    reference = -logp.gather(-1, target.clamp_min(0)[..., None]).squeeze(-1)[keep].sum() / keep.sum()
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-6)


def test_sft_learns_and_is_deterministic():
    cfg = compose("arith", SMALL + ["warmstart.steps=30", "warmstart.batch_size=8", "warmstart.warmup_steps=5",
                                    "warmstart.lr=1e-2"])
    from popo_core.data.tasks import arith_sft_examples

    def run():
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tok, hidden_size=64, num_layers=1, num_heads=2, seed=0)
        seen = []
        losses = warmstart.sft(model, tok, arith_sft_examples(cfg.data, 0), cfg.warmstart,
                               lambda s, n, loss: seen.append((s, n)))
        return model, losses, seen

    m1, l1, seen = run()
    m2, l2, _ = run()
    assert seen == [(s, 30) for s in range(1, 31)]
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
    assert sum(l1[-5:]) / 5 < 0.7 * sum(l1[:5]) / 5


def test_ensure_builds_once_then_reuses(cache):
    cfg = compose("arith", SMALL)
    builds = []
    resolved = warmstart.ensure(cfg, on_build=builds.append)
    path = Path(resolved.model.name_or_path)
    assert builds == [path] and path.parent == cache and path.name == warmstart.spec_hash(cfg)
    assert resolved.data == cfg.data and resolved.warmstart == cfg.warmstart  # only the model path changed
    info = json.loads((path / "warmstart.json").read_text())
    assert info["spec"] == warmstart.spec(cfg) and 0.0 <= info["heldout_greedy_accuracy"] <= 1.0
    assert (path / "model.safetensors").is_file() and (path / "config.yaml").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again = warmstart.ensure(cfg, on_build=builds.append)
    assert again.model.name_or_path == str(path) and len(builds) == 1
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, path.name + ".lock"])  # no temp dirs
    # It loads as a model directory, with the character tokenizer.
    model, tok = load_model_and_tokenizer(ModelConfig(name_or_path=str(path)), device=torch.device("cpu"))
    assert tok("3+4=", add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(c) for c in "3+4="]
    assert model.config.hidden_size == 64
    # Pointing model.name_or_path at it uses it as is.
    assert warmstart.ensure(compose("arith", [*SMALL, f"model.name_or_path={path}"])).model.name_or_path == str(path)
    # Another recipe is another directory.
    other = warmstart.ensure(compose("arith", [*SMALL, "warmstart.seed=1"]), on_build=builds.append)
    assert other.model.name_or_path != str(path) and len(builds) == 2


def test_a_failed_build_leaves_nothing_and_an_incomplete_dir_is_rebuilt(cache):
    cfg = compose("arith", SMALL)

    def boom(step, total, loss):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        warmstart.ensure(cfg, boom)
    path = warmstart.path_for(cfg)
    assert not path.exists() and [p.name for p in cache.iterdir()] == [path.name + ".lock"]
    path.mkdir()
    (path / "model.safetensors").write_text("half-written")  # no marker: not a built warm start
    resolved = warmstart.ensure(cfg)
    assert warmstart.is_built(Path(resolved.model.name_or_path))
    load_model_and_tokenizer(ModelConfig(name_or_path=resolved.model.name_or_path), device=torch.device("cpu"))


def test_other_models_pass_through_and_the_recipe_is_not_a_model():
    cfg = compose("tiny")
    assert warmstart.ensure(cfg) is cfg
    with pytest.raises(ModelLoadError, match="warmstart"):
        load_model_and_tokenizer(replace(cfg.model, name_or_path="warmstart"))


@pytest.mark.slow
def test_concurrent_runs_build_once(cache, tmp_path):
    script = (
        "import sys; from popo_core.config import compose; from popo_core.model import warmstart\n"
        f"cfg = compose('arith', {SMALL!r})\n"
        "warmstart.ensure(cfg, on_build=lambda p: open(sys.argv[1], 'a').write('built\\n'))\n"
    )
    log = tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", script, str(log)]) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert log.read_text() == "built\n"


# ------------------------------------------------------------------------- the shipped warm start
SHIPPED = Path(warmstart.__file__).resolve().parents[1] / "resources" / "models" / "arith-warmstart"


def test_the_shipped_warm_start_is_what_its_record_says_and_ships_in_the_package():
    import fnmatch
    import hashlib
    import tomllib

    from popo_core.model import packaged

    assert packaged.shipped_dir("popo:arith-warmstart") == SHIPPED
    info = warmstart.read_info(SHIPPED)
    assert hashlib.sha256((SHIPPED / "model.safetensors").read_bytes()).hexdigest() == info["model_sha256"]
    # the arith preset is the configuration it was built from
    mine = warmstart.spec(compose("arith"))
    assert {k: info["spec"][k] for k in ("data", "model", "warmstart")} == {k: mine[k] for k in ("data", "model", "warmstart")}
    assert compose("arith").model.name_or_path == "popo:arith-warmstart"
    assert "name_or_path: popo:arith-warmstart" in (SHIPPED / "config.yaml").read_text()  # popo eval reads its data
    # every file of it is package data (an installed wheel has it)
    globs = tomllib.loads((SHIPPED.parents[3] / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for file in SHIPPED.iterdir():
        assert any(fnmatch.fnmatch(f"models/arith-warmstart/{file.name}", g) for g in globs["popo_core.resources"]), file


def test_the_shipped_warm_start_loads_offline_and_gives_its_recorded_accuracy():
    """The held-out greedy accuracy of warmstart.json, measured again from the shipped files."""
    from popo_core.data.tasks import load_task

    cfg = compose("arith")
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters()) == 1_064_192  # 4 layers, 128 wide, tied embeddings
    _, held_out = load_task(cfg)
    accuracy = warmstart.greedy_accuracy(model, tokenizer, held_out, "arith", template=cfg.model.template,
                                         max_new_tokens=cfg.model.bench_max_new_tokens)
    assert len(held_out) == 200 and accuracy == pytest.approx(warmstart.read_info(SHIPPED)["heldout_greedy_accuracy"], abs=0.011)


@pytest.mark.parametrize("override, key", [
    ("data.max_terms=6", "data.max_terms=5"), ("data.seed=1", "data.seed=0"), ("data.max_operand=8", "data.max_operand=9"),
    ("model.num_layers=3", "model.num_layers=4"), ("model.template=chat", "model.template=plain"),
    ("warmstart.steps=10", "warmstart.steps=600"), ("warmstart.seed=1", "warmstart.seed=0"),
])
def test_the_shipped_warm_start_refuses_settings_it_was_not_built_with(override, key):
    from popo_core.errors import ConfigError

    with pytest.raises(ConfigError, match=f"built with {key}, not .*model.name_or_path=warmstart"):
        compose("arith", [override])
    compose("arith", [override, "model.name_or_path=warmstart"])  # the recipe builds one for them


def test_the_shipped_warm_start_takes_what_does_not_change_it():
    for override in ("trainer.seed=3", "algo=grpo", "data.eval_size=10", "data.train_size=100", "optim.lr=3e-5"):
        compose("arith", [override])


def test_unknown_or_missing_shipped_models_are_one_line_errors(monkeypatch, tmp_path):
    from popo_core.model import packaged

    with pytest.raises(ModelLoadError, match="unknown shipped model .*popo:arith-warmstart"):
        compose("arith", ["model.name_or_path=popo:arith-warmstrt"])
    monkeypatch.setattr(packaged, "SHIPPED_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="missing from this installation"):
        compose("arith")


def test_popo_eval_takes_the_shipped_name_with_its_data_settings():
    from popo_core.evaluation.runner import resolve_model
    from popo_core.evaluation.synthetic import data_settings

    cfg = resolve_model("popo:arith-warmstart")
    assert cfg.name_or_path == str(SHIPPED) and cfg.bench_max_new_tokens == 64
    data, where = data_settings("arith", cfg.name_or_path)
    assert where == str(SHIPPED / "config.yaml") and (data.max_terms, data.eval_size) == (5, 200)
