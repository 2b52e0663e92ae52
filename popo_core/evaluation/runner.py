"""One `popo eval` run: pick benchmarks, generate (or read responses), grade, summarise, write, log.

The CLI parses flags into EvalSettings and renders the result; everything a test would want to
check lives here.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from popo_core.evaluation import suite as bm
from popo_core.evaluation import synthetic
from popo_core.data.datasets import TEMPLATE_NAMES, Problem
from popo_core.errors import ConfigError, DataError, ModelLoadError
from popo_core.evaluation.metrics import BenchmarkSummary, EvalReport, evaluate_problems, grade_responses, summarize
from popo_core.grading.math_grader import EXTRACTION, MathVerifier

# progress(description, total) -> advance(n)
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass
class EvalSettings:
    benches: list[str]
    data: str | None = None
    model: str | None = None
    responses: str | None = None
    template: str | None = None  # None: the model preset's (or the checkpoint run's) template
    engine: str = "hf"
    tensor_parallel_size: int = 1  # vllm only
    samples: int = 1
    temperature: float | None = None  # 0: greedy; None: greedy for one sample, 1.0 for several
    top_p: float = 1.0
    eval_max_new_tokens: int | None = None  # --max-new-tokens; None: the model's bench_max_new_tokens (3000 for real models)
    limit: int | None = None
    answered_only: bool = False  # --answered-only: metrics over the problems a --responses file answers
    workers: int | None = None  # None: min(4, cpu count)
    timeout: int = 5
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    batch_prompts: int = 64
    output: str | None = None
    run_id: str | None = None  # a training run to nest under
    tracking: bool = True
    tracking_uri: str | None = None
    experiment: str = "popo"

    def __post_init__(self) -> None:
        if self.temperature is None:
            self.temperature = 0.0 if self.samples == 1 else 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate(s: EvalSettings) -> None:
    """Each error names its flag."""
    if (s.model is None) == (s.responses is None):
        raise ConfigError("give exactly one of --model (generate) or --responses FILE (grade existing responses)")
    if s.answered_only and s.responses is None:
        raise ConfigError("--answered-only leaves out the problems a --responses file does not answer; "
                          "with --model every problem is answered")
    if s.samples < 1:
        raise ConfigError(f"--samples {s.samples}: must be >= 1")
    if s.temperature < 0:
        raise ConfigError(f"--temperature {s.temperature}: must be >= 0 (0: greedy)")
    if s.samples > 1 and s.greedy and s.model is not None:
        raise ConfigError(f"--samples {s.samples} with greedy decoding repeats one response; set --temperature > 0")
    if not 0.0 < s.top_p <= 1.0:
        raise ConfigError(f"--top-p {s.top_p}: must be in (0, 1]")
    if s.eval_max_new_tokens is not None and s.eval_max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {s.eval_max_new_tokens}: must be >= 1")
    _check_limit(s)
    if s.workers is not None and s.workers < 0:
        raise ConfigError(f"--workers {s.workers}: must be >= 0 (0: grade in this process)")
    if s.timeout < 1:
        raise ConfigError(f"--timeout {s.timeout}: must be a whole number of seconds >= 1")
    if s.template is not None and s.template not in TEMPLATE_NAMES:
        raise ConfigError(f"--template {s.template}: unknown (choose from: {', '.join(TEMPLATE_NAMES)})")
    if s.engine not in ("hf", "vllm"):
        raise ConfigError(f"--engine {s.engine}: must be hf or vllm")
    if s.tensor_parallel_size < 1:
        raise ConfigError(f"--tensor-parallel-size {s.tensor_parallel_size}: must be >= 1")
    if s.tensor_parallel_size > 1 and s.engine != "vllm":
        raise ConfigError(f"--tensor-parallel-size {s.tensor_parallel_size}: needs --engine vllm")
    if s.run_id and not s.tracking:
        raise ConfigError("--run-id nests the eval run in MLflow; it cannot go with --no-tracking")
    if s.threads is not None and s.threads < 1:
        raise ConfigError(f"--threads {s.threads}: must be >= 1")
    from popo_core import preflight  # what the machine must offer, before any problem is read

    if s.output:
        preflight.output_dir(s.output, key="--output")
    if s.model is not None:
        preflight.device(s.device, key="--device")
    if s.tracking:
        preflight.tracking(s.tracking_uri, key="--tracking-uri")


def _check_limit(s: EvalSettings) -> None:
    if s.limit is not None and s.limit < 1:
        raise ConfigError(f"--limit {s.limit}: must be >= 1")


# ------------------------------------------------------------------------------------ the model
def model_presets() -> list[str]:
    from popo_core.config import config_dir

    return sorted(p.stem for p in (config_dir() / "model").glob("*.yaml"))


def resolve_model(spec: str, template: str | None = None):
    """(ModelConfig, template) for a model preset name, a local checkpoint directory or a Hub id.

    A checkpoint written by `popo train` takes its template from the run's config.yaml (in the
    directory, or two levels up for checkpoint/policy); failing that, `plain`.
    """
    from omegaconf import OmegaConf

    from popo_core.config import ModelConfig, config_dir
    from popo_core.data.datasets import looks_like_path

    from popo_core.model import packaged

    if packaged.is_shipped(spec):  # a model popo ships: its directory (with the config.yaml it was built with)
        spec = str(packaged.shipped_dir(spec))
    if spec in model_presets():
        raw = OmegaConf.load(config_dir() / "model" / f"{spec}.yaml")
        cfg: ModelConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), raw))  # type: ignore[assignment]
    elif Path(spec).is_dir():
        cfg = ModelConfig(name_or_path=spec)
        for run_config in (Path(spec) / "config.yaml", Path(spec).parent / "config.yaml", Path(spec).parent.parent / "config.yaml"):
            if run_config.is_file():
                saved = OmegaConf.load(run_config).get("model", {})
                cfg.template = saved.get("template", cfg.template)
                cfg.dtype = saved.get("dtype", cfg.dtype)
                cfg.bench_max_new_tokens = saved.get("bench_max_new_tokens", cfg.bench_max_new_tokens)
                break
        if not any((Path(spec) / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ModelLoadError(f"--model {spec}: directory has no config.json or adapter_config.json (not a saved model)")
    elif looks_like_path(spec):
        raise ModelLoadError(f"--model {spec}: not a model preset ({', '.join(model_presets())}), a directory, or a Hub id")
    else:
        cfg = ModelConfig(name_or_path=spec)
    if template is not None:
        cfg.template = template
    return cfg


# ----------------------------------------------------------------------------------- protocol
@dataclass
class Protocol:
    source: str  # "model <name>" or "responses <file>"
    template: str | None
    sampling: str
    max_new_tokens: int | None
    extraction: str
    grader: str
    ci: str
    answered_only: bool | None = None  # None: a model answered every problem

    def lines(self) -> list[str]:
        gen = (f"template {self.template}; {self.sampling}; max_new_tokens {self.max_new_tokens}"
               if self.template is not None else "generation settings: those of the responses file")
        out = [f"source: {self.source}; {gen}", f"extraction: {self.extraction}; grader: {self.grader}", f"interval: {self.ci}"]
        if self.answered_only is not None:
            out.append("scoring: " + SCORING[self.answered_only])
        return out

    def to_json(self) -> dict:
        return dict(self.__dict__)


SCORING = {
    False: "over every problem; one without a response is graded wrong, and so is each absent sample of a problem "
           "with fewer than K responses (--answered-only: the answered problems only)",
    True: "--answered-only: over the answered problems only, each over the responses it has; problems without a "
          "response are left out",
}


def make_protocol(s: EvalSettings, grader: str, template: str | None) -> Protocol:
    sampling = ("greedy (temperature 0)" if s.greedy else f"sampling temperature {s.temperature}, top_p {s.top_p}")
    sampling += f", {s.samples} sample{'s' if s.samples > 1 else ''} per problem"
    source = f"model {s.model}" if s.model else f"responses {s.responses}"
    return Protocol(
        source=source,
        template=template if s.model else None,
        sampling=sampling if s.model else "from the responses file",
        max_new_tokens=s.eval_max_new_tokens if s.model else None,
        extraction=EXTRACTION,
        grader=f"{grader}; gold/answer normalised per benchmark",
        ci="95%, Wilson over problems when each problem is all right or all wrong (always so with one sample), "
           "else percentile bootstrap over problems (2000 rounds)",
        answered_only=s.answered_only if s.responses else None,
    )


# ------------------------------------------------------------------------------------ the run
@dataclass
class BenchResult:
    bench: bm.Benchmark
    source: str
    report: EvalReport
    summary: BenchmarkSummary


@dataclass
class EvalResult:
    protocol: Protocol
    results: list[BenchResult] = field(default_factory=list)
    run_id: str | None = None
    output: Path | None = None
    warnings: list[str] = field(default_factory=list)  # each one line, for stderr


def _no_progress(description: str, total: int) -> Callable[[int], None]:
    return lambda n: None


def run_eval(s: EvalSettings, progress: ProgressFactory = _no_progress) -> EvalResult:
    validate(s)
    synthetic_names, named = synthetic.split_names(s.benches)
    if synthetic_names:
        return _run_synthetic(s, synthetic_names, named, progress)
    benches = bm.resolve(s.benches)
    problem_sets = bm.load_all(benches, s.data)
    limited = {name: every[: s.limit] if s.limit else every for name, every in problem_sets.items()}
    given = _match_all(s, benches, problem_sets, limited) if s.responses else {}
    experiment = _experiment(s) if s.tracking else None  # an unknown --run-id fails before any work
    model_cfg = resolve_model(s.model, s.template) if s.model else None
    if s.eval_max_new_tokens is None:
        s.eval_max_new_tokens = model_cfg.bench_max_new_tokens if model_cfg else 3000

    with MathVerifier(workers=s.workers, timeout=s.timeout) as verifier:
        verifier.start()
        model = _Model(s, model_cfg) if model_cfg else None
        result = EvalResult(make_protocol(s, verifier.describe(), model.template if model else None))
        for bench in benches:
            if bench.name in given:
                kept, texts, missing = given[bench.name]
                grade_bar = progress(f"grade {bench.name}", sum(len(t) for t in texts))
                report = grade_responses(kept, texts, verifier, normalize=bench.normalize, progress=grade_bar)
                result.warnings += bm.coverage_warnings(bench.name, texts, missing, total=len(problem_sets[bench.name]),
                                                        limit=s.limit, answered_only=s.answered_only)
            else:
                missing = 0
                report = model.evaluate(bench, limited[bench.name], verifier, progress)
            summary = summarize(report, bench.name, missing=missing, answered_only=s.answered_only, seed=s.seed)
            result.results.append(BenchResult(bench, bm.source(bench, s.data), report, summary))
    return _finish(s, result, experiment)


def list_ids(s: EvalSettings) -> list[tuple[str, Problem]]:
    """(bench, problem) for each problem --bench, --data and --limit select: the ids a --responses file
    names. Reads the benchmark files and nothing else (no model, no grader)."""
    synthetic_names, _ = synthetic.split_names(s.benches)
    if synthetic_names:
        raise ConfigError(f"--list-ids: {synthetic_names[0]} is a synthetic task, graded from --model only; "
                          "it has no ids for a --responses file")
    _check_limit(s)
    benches = bm.resolve(s.benches)
    problem_sets = bm.load_all(benches, s.data)
    return [(b.name, p) for b in benches for p in problem_sets[b.name][: s.limit]]


def _finish(s: EvalSettings, result: EvalResult, experiment: str | None) -> EvalResult:
    """Write the output files and the MLflow run, where asked for."""
    if s.output:
        result.output = write_outputs(result, Path(s.output))
    if experiment:
        result.run_id = log_to_mlflow(s, result, experiment)
    return result


def _run_synthetic(s: EvalSettings, names: list[str], others: list[str], progress: ProgressFactory) -> EvalResult:
    """Synthetic tasks (popo_core.evaluation.synthetic): their held-out prompts, graded by their verifier."""
    import dataclasses

    from popo_core.data.tasks import make_verifier

    if others:
        raise ConfigError(f"--bench {names[0]} is a synthetic task: evaluate it on its own, not with {others[0]}")
    if s.responses or s.data:
        raise ConfigError(f"--bench {names[0]} generates its own held-out prompts: give --model, not --responses or --data")
    held = [synthetic.held_out(name, s.model) for name in names]  # bad settings fail before any work
    experiment = _experiment(s) if s.tracking else None
    model_cfg = resolve_model(s.model, s.template)  # type: ignore[arg-type]
    if s.eval_max_new_tokens is None:
        s.eval_max_new_tokens = model_cfg.bench_max_new_tokens
    model = _Model(s, model_cfg)
    protocol = make_protocol(s, "", model.template)
    protocol = dataclasses.replace(
        protocol, source=f"{protocol.source}; " + "; ".join(src for _, _, src in held),
        extraction="; ".join(synthetic.EXTRACTION[n] for n in names),
        grader="; ".join(synthetic.GRADER[n] for n in names))
    result = EvalResult(protocol)
    for name, (bench, problems, src) in zip(names, held):
        problems = problems[: s.limit] if s.limit else problems
        report = model.evaluate(bench, problems, make_verifier(name), progress)
        result.results.append(BenchResult(bench, src, report, summarize(report, name, seed=s.seed)))
    return _finish(s, result, experiment)


def _match_all(s: EvalSettings, benches, problem_sets, limited) -> dict[str, tuple[list[Problem], list[list[str]], int]]:
    """Every benchmark's (problems with responses, responses, missing), checked before any grading."""
    responses = bm.read_responses(s.responses)  # type: ignore[arg-type]
    unknown = sorted({r.bench for r in responses if r.bench is not None} - set(bm.BENCHMARKS))
    if unknown:
        raise DataError(f"{s.responses}: unknown bench {unknown[0]!r} (choose from: {', '.join(bm.BENCHMARKS)})")
    out = {}
    for bench in benches:
        out[bench.name] = bm.match_responses(bench, limited[bench.name], responses, several=len(benches) > 1,
                                             all_ids={p.id for p in problem_sets[bench.name]}, path=str(s.responses))
        if not out[bench.name][0]:
            raise DataError(f"{s.responses}: no responses for {bench.name}" + (" in its first --limit problems" if s.limit else ""))
    return out


class _Model:
    """The model and its generation engine, loaded once for all benchmarks."""

    def __init__(self, s: EvalSettings, cfg):
        self.s = s
        self.template = cfg.template

        import torch

        from popo_core.model.loading import load_model_and_tokenizer, resolve_device
        from popo_core.rollout import make_engine

        if s.threads:
            torch.set_num_threads(s.threads)
        try:
            device = resolve_device(s.device)
        except RuntimeError as err:
            raise ConfigError(f"--device {s.device}: {err}") from None
        if s.engine == "vllm":
            self.engine, self.tokenizer = _vllm_engine(s, cfg, device)
            return
        model, self.tokenizer = load_model_and_tokenizer(cfg, device=device, seed=s.seed)
        model.eval()
        self.engine = make_engine(s.engine, model, self.tokenizer)

    def evaluate(self, bench: bm.Benchmark, problems: list[Problem], verifier, progress: ProgressFactory) -> EvalReport:
        """The trainer's held-out evaluation (evaluate_problems), with the benchmark's normaliser."""
        import torch

        s = self.s
        torch.manual_seed(s.seed)
        gen_bar = progress(f"generate {bench.name}", len(problems))
        grade_bar = progress(f"grade {bench.name}", len(problems) * s.samples)
        return evaluate_problems(
            self.engine, self.tokenizer, problems, verifier, template=self.template, samples=s.samples,
            temperature=1.0 if s.greedy else s.temperature, top_p=s.top_p, max_new_tokens=s.eval_max_new_tokens,
            greedy=s.greedy, batch_prompts=s.batch_prompts, progress=gen_bar, normalize=bench.normalize,
            grade_progress=grade_bar,
        )


def _vllm_engine(s: EvalSettings, cfg, device):
    """A vLLM engine holding the model's weights, and the tokenizer.

    vLLM keeps its own copy of the weights, so the transformers copy is built on the CPU (in the
    dtype the device would use), pushed once and freed, never a second copy on the GPU.
    """
    import dataclasses

    import torch

    from popo_core.config import RolloutConfig
    from popo_core.model.loading import load_model_and_tokenizer, resolve_dtype
    from popo_core.rollout import make_engine
    from popo_core.rollout.vllm import named_tensors

    dtype = str(resolve_dtype(cfg.dtype, device)).removeprefix("torch.")
    model, tokenizer = load_model_and_tokenizer(dataclasses.replace(cfg, dtype=dtype), device=torch.device("cpu"), seed=s.seed)
    # The engine is alone on the GPU here, so it may take vLLM's usual share of its memory.
    rollout = RolloutConfig(engine="vllm", tensor_parallel_size=s.tensor_parallel_size, gpu_memory_utilization=0.9)
    engine = make_engine("vllm", model, tokenizer, seed=s.seed, trust_remote_code=cfg.trust_remote_code, rollout=rollout,
                         keys={"engine": "--engine", "tensor_parallel_size": "--tensor-parallel-size"})
    engine.push_weights(named_tensors(model))
    return engine, tokenizer


# -------------------------------------------------------------------------------------- output
def summary_json(result: EvalResult) -> list[dict]:
    """One object per benchmark, each with the protocol it was measured under."""
    return [r.summary.to_json() | {"source": r.source, "protocol": result.protocol.to_json()} for r in result.results]


def write_outputs(result: EvalResult, out: Path) -> Path:
    """summary.json and samples.jsonl (one line per response) under `out`."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary_json(result), indent=1) + "\n")
        with open(out / "samples.jsonl", "w", encoding="utf-8") as f:
            for r in result.results:
                for problem, texts, grades in zip(r.report.problems, r.report.responses, r.report.grades):
                    for k, (text, grade) in enumerate(zip(texts, grades)):
                        f.write(json.dumps({
                            "bench": r.bench.name, "id": problem.id, "sample": k, "response": text,
                            "extracted": grade.extracted, "gold": problem.answer, "correct": grade.correct,
                            "status": grade.status,
                        }, ensure_ascii=False) + "\n")
    except OSError as err:
        raise DataError(f"--output {out}: cannot write ({err.strerror or err})") from None
    return out


def _experiment(s: EvalSettings) -> str:
    """The MLflow experiment to log to: --experiment, or the --run-id parent's."""
    if not s.run_id:
        return s.experiment
    from popo_core.tracking import client

    c = client(s.tracking_uri)
    try:
        parent = c.get_run(s.run_id)
    except Exception:  # MlflowException for an unknown id
        raise DataError(f"--run-id {s.run_id}: no such MLflow run in the tracking store") from None
    return c.get_experiment(parent.info.experiment_id).name


def log_to_mlflow(s: EvalSettings, result: EvalResult, experiment: str) -> str:
    """An eval run (a child of --run-id when given): params, <bench>/... metrics, summary.json."""
    from popo_core.tracking import MlflowRun

    p = result.protocol
    # One name per knob: a setting popo train also has is logged under its train name.
    params = {"eval.benches": ",".join(r.bench.name for r in result.results), "eval.source": p.source,
              "eval.limit": s.limit, "eval.extraction": p.extraction, "eval.grader": p.grader, "eval.timeout": s.timeout,
              "trainer.seed": s.seed}
    if s.responses:
        params["eval.answered_only"] = s.answered_only
    if s.model:
        params |= {"model.template": p.template, "eval.samples": s.samples, "rollout.temperature": s.temperature,
                   "rollout.top_p": s.top_p, "rollout.eval_max_new_tokens": s.eval_max_new_tokens,
                   "rollout.engine": s.engine, "rollout.tensor_parallel_size": s.tensor_parallel_size}
    name = f"eval-{Path(s.model).name if s.model else Path(s.responses or '').stem}"
    with MlflowRun(uri=s.tracking_uri, experiment=experiment, run_name=name, parent_run_id=s.run_id,
             tags={"popo.kind": "eval"}) as run:
        run.log_params(params)
        metrics: dict[str, float] = {}
        for r in result.results:
            metrics |= r.summary.mlflow_metrics()
        run.log_metrics(metrics, step=0)
        if result.output is not None:
            run.log_artifact(result.output / "summary.json")
        else:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "summary.json"
                path.write_text(json.dumps(summary_json(result), indent=1) + "\n")
                run.log_artifact(path)
        return run.run_id  # type: ignore[return-value]
