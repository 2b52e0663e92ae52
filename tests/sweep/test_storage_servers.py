"""`popo sweep` spread over workers, against the real servers: a PostgreSQL study and an MLflow
tracking server, both started here on loopback (127.0.0.1, free ports, a temp directory) and
stopped at the end. The workers are real `popo sweep` processes on this one machine: what several
machines would do, short of the network between them.

PostgreSQL is the Debian package (`apt-get install -y postgresql`, done by .ci/run); its driver is
psycopg 3 (`pip install 'popo[postgres]'`, done by `make setup`). Without them the tests skip,
saying why, except where POPO_REQUIRE_SERVERS=1 (CI), where they fail.
"""

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import assert_one_line_error

pytestmark = pytest.mark.slow

PASSWORD = "pw-s3cret-7c1f"  # must never appear in any output, log line or MLflow param/tag
USER = "popo"
# A worker on a loaded 2-core machine can miss heartbeats for several seconds: a grace period that
# short makes another worker take its trial over (handled, but not what these tests are about).
HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "30"]
KILL_HEARTBEAT = ["--heartbeat-interval", "1", "--grace-period", "10"]  # the survivor waits this long
# About a second of training a trial: 6 steps of 12 prompts x 4 completions, evaluations at 0/3/6.
SHORT = ["trainer.max_steps=6", "rollout.prompts_per_step=12", "rollout.group_size=4", "trainer.eval_every=3",
         "trainer.save_every=2"]
# Long enough (2-15 s, by the machine's load) to be killed mid-trial after a checkpoint (every 5 steps).
LONGER = ["trainer.max_steps=20", "rollout.prompts_per_step=12", "rollout.group_size=4", "trainer.eval_every=10",
          "trainer.save_every=5"]


def _missing(reason: str):
    if os.environ.get("POPO_REQUIRE_SERVERS") == "1":
        pytest.fail(f"{reason} (POPO_REQUIRE_SERVERS=1: CI must run these tests; see .ci/run)")
    pytest.skip(reason)


def _pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    # Debian keeps the server's programs out of PATH, one directory per major version.
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        _missing(f"PostgreSQL server program {name} not found: apt-get install -y postgresql")
    return candidates[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A throwaway PostgreSQL cluster in a temp dir, listening on 127.0.0.1 only (no Unix socket
    outside that dir). As root it runs as the `postgres` user: the server refuses to run as root."""

    def __init__(self):
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        self.as_user: list[str] = []
        self.dir = Path(tempfile.mkdtemp(prefix="popo-pg-"))
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir)
                _missing("running as root and there is no `postgres` user to run the server (apt-get install -y postgresql)")
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self.data, self.log = self.dir / "data", self.dir / "server.log"
        self.port = None

    def _run(self, *args: str, timeout: float = 120) -> None:
        proc = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout}\n{proc.stderr}\n{self._log_tail()}"

    def _log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def start(self) -> None:
        pwfile = self.dir / "pwfile"
        pwfile.write_text(PASSWORD + "\n")
        if self.as_user:
            shutil.chown(pwfile, "postgres")
        self._run(self.initdb, "-D", str(self.data), "-U", USER, "--auth=scram-sha-256", f"--pwfile={pwfile}",
                  "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        for attempt in range(3):  # a free port may be taken between the check and the bind
            self.port = _free_port()
            opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} "
                    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            proc = subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w",
                                   "-t", "60", "-o", opts, "start"], capture_output=True, text=True, timeout=90)
            if proc.returncode == 0:
                return
        raise AssertionError(f"pg_ctl start failed:\n{proc.stdout}\n{proc.stderr}\n{self._log_tail()}")

    def url(self, db: str, password: bool = True, driver: str = "psycopg") -> str:
        auth = f"{USER}:{PASSWORD}" if password else USER
        return f"postgresql+{driver}://{auth}@127.0.0.1:{self.port}/{db}"

    def create_database(self, name: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname="postgres",
                             autocommit=True, connect_timeout=15) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def stop(self) -> None:
        if self.port is not None and (self.data / "postmaster.pid").exists():
            subprocess.run([*self.as_user, self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"],
                           capture_output=True, timeout=90)
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with its own backend store (a PostgreSQL database) and
    proxied artifacts in a temp dir; its own process group, so stopping it stops its workers."""

    def __init__(self, backend: str, root: Path):
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "mlflow-server.log"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runners
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend,
                 "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
                 "--workers", "1"],
                cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, f"mlflow server exited:\n{self.log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Postgres, MlflowServer), started once for the module and stopped after it."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        _missing("the PostgreSQL driver psycopg is not installed: pip install 'popo[postgres]'")
    root = tmp_path_factory.mktemp("servers")
    pg = Postgres()
    mlflow_server = None
    try:
        pg.start()
        pg.create_database("mlflow")
        mlflow_server = MlflowServer(pg.url("mlflow"), root)
        mlflow_server.wait_ready()
        yield pg, mlflow_server
    finally:
        if mlflow_server is not None:
            mlflow_server.stop()
        pg.stop()


# ------------------------------------------------------------------------------------ helpers
class Worker:
    """One `popo sweep` process (the real CLI), its output in files so nothing blocks on a pipe."""

    def __init__(self, args: list[str], cwd: Path, name: str, env: dict | None = None):
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        full_env.pop("MLFLOW_TRACKING_URI", None)  # tracking goes to the server, by tracking.uri=
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "popo_cli.main", *args], cwd=cwd, env=full_env,
                                         stdout=out, stderr=err)

    def wait(self, timeout: float = 600) -> int:
        return self.proc.wait(timeout)

    def text(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def ran(self) -> int:
        return int(self.out.read_text().rsplit("this worker ran ", 1)[1].split()[0])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


@pytest.fixture
def workers():
    """Workers started by a test; any still alive at its end (a failed assertion) are killed."""
    started: list[Worker] = []
    yield started
    for w in started:
        w.kill()


def sweep_args(pg, server, db: str, study: str, trials: int, training: list[str], password: bool = True,
               heartbeat: list[str] = HEARTBEAT) -> list[str]:
    return ["sweep", "momentum", "tiny", "--trials", str(trials), "--study", study,
            "--storage", pg.url(db, password=password), *heartbeat, *training, f"tracking.uri={server.uri}"]


def load_trials(pg, db: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=pg.url(db)).get_trials()


def study_runs(server, study: str):
    """(parent run, nested runs) of a study on the tracking server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=server.uri)
    exp = client.get_experiment_by_name("popo")
    (parent,) = client.search_runs([exp.experiment_id], f"tags.`popo.sweep.study` = '{study}'")
    nested = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
                                max_results=1000)
    return client, parent, nested


def steps_logged(output_dir: Path) -> list[int]:
    import json

    log = output_dir / "metrics.jsonl"
    return [json.loads(ln)["step"] for ln in log.read_text().splitlines() if ln.strip()] if log.exists() else []


def assert_no_password(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text


def assert_runs_hold_no_password(parent, nested) -> None:
    for run in [parent, *nested]:
        assert_no_password(repr(run.data.params), repr(run.data.tags))


# -------------------------------------------------------------------------------------- tests
def test_a_postgres_storage_error_is_one_line_with_the_password_masked(servers, tmp_path):
    pg, _ = servers
    url = pg.url("postgres").replace(PASSWORD, "wrong-" + PASSWORD)
    proc = subprocess.run([sys.executable, "-m", "popo_cli.main", "sweep", "momentum", "--storage", url,
                           "tracking.enabled=false"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "--storage", f"{USER}:***@127.0.0.1", "password authentication failed")
    assert_no_password(proc.stdout, proc.stderr)


def test_workers_opening_a_new_postgres_study_together_do_not_race(servers, tmp_path):
    """Four processes open one new database at the same instant, two with the password in the URL
    and two through $PGPASSWORD (one lock for both). Without the advisory lock in
    popo_core.store_lock, 3 runs of 3 lost two or three processes to a duplicate-key error."""
    pg, _ = servers
    pg.create_database("race")
    code = ("import sys, time\n"
            "from popo_core.sweep.storage import open_storage\n"
            "import optuna.storages, sqlalchemy, psycopg\n"
            "assert time.time() < float(sys.argv[2]), 'imports outlasted the common start'\n"
            "while time.time() < float(sys.argv[2]): time.sleep(0.001)\n"
            "open_storage(sys.argv[1], 10, 60, 3)\n")
    start = time.time() + 12  # past every process's imports
    procs = [subprocess.Popen([sys.executable, "-c", code, pg.url("race", password=i % 2 == 0), str(start)],
                              cwd=tmp_path, env={**os.environ, "PGPASSWORD": PASSWORD},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err


def test_two_workers_share_one_postgres_study_tracked_on_an_mlflow_server(servers, tmp_path, workers):
    pg, server = servers
    pg.create_database("optuna")
    n, study = 4, "shared"
    # One worker names the password in the URL, the other leaves it to libpq's $PGPASSWORD.
    workers.append(Worker(sweep_args(pg, server, "optuna", study, n, SHORT), tmp_path, "a"))
    workers.append(Worker(sweep_args(pg, server, "optuna", study, n, SHORT, password=False), tmp_path, "b",
                          env={"PGPASSWORD": PASSWORD}))
    for w in workers:
        assert w.wait() == 0, w.text()
        assert_no_password(w.text())

    trials = load_trials(pg, "optuna", study)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == n
    # Anything else is a trial that stepped back before training because the study was full.
    assert all(t.user_attrs.get("popo.surplus") and not t.params for t in trials if t.state.name != "COMPLETE")
    # None ran twice: one directory per trial, each trained once through steps 0..6.
    dirs = [tmp_path / t.user_attrs["popo.output_dir"] for t in complete]
    assert len(set(dirs)) == n
    for d in dirs:
        assert (d / "result.json").exists() and steps_logged(d) == list(range(7))
    ran = [w.ran() for w in workers]
    assert sum(ran) == n and min(ran) >= 1, ran  # both took part
    assert len({t.user_attrs["popo.worker"] for t in complete}) == 2

    client, parent, nested = study_runs(server, study)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["popo.sweep.storage"].startswith(f"postgresql+psycopg://{USER}")
    assert len(nested) == n  # one nested run per trial
    by_trial = {int(r.data.tags["optuna.trial_number"]): r for r in nested}
    assert sorted(by_trial) == sorted(t.number for t in complete)
    for t in complete:
        run = by_trial[t.number]
        assert run.info.run_id == t.user_attrs["popo.mlflow_run_id"]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert float(run.data.params["algo.momentum"]) == pytest.approx(t.params["algo.momentum"])
        assert float(run.data.tags["optuna.value"]) == pytest.approx(t.value)
    assert_runs_hold_no_password(parent, nested)
    # Artifacts went through the server's proxy, not to this directory.
    assert {"plots/history.png", "plots/slice.png"} <= {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "config.yaml" in {a.path for a in client.list_artifacts(nested[0].info.run_id)}
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_a_worker_killed_mid_trial_is_retried_by_the_other(servers, tmp_path, workers):
    pg, server = servers
    pg.create_database("optuna_kill")
    n, study = 3, "kill"
    args = sweep_args(pg, server, "optuna_kill", study, n, LONGER, heartbeat=KILL_HEARTBEAT)
    victim = Worker(args, tmp_path, "victim")
    survivor = Worker(args, tmp_path, "survivor")
    workers += [victim, survivor]

    # Kill the victim while it trains a trial past its first checkpoint (step 5) and before its end.
    import optuna

    from popo_core.store_lock import init_lock

    with init_lock(pg.url("optuna_kill")):  # the workers may be creating the schema right now
        storage = optuna.storages.RDBStorage(pg.url("optuna_kill"))
    deadline, dead = time.time() + 300, None
    while dead is None:
        assert time.time() < deadline, "the victim never got past a checkpoint:\n" + victim.text()
        assert victim.proc.poll() is None and survivor.proc.poll() is None, victim.text() + survivor.text()
        try:
            running = optuna.load_study(study_name=study, storage=storage).get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        except KeyError:  # the study is not created yet
            running = []
        for t in running:
            if t.user_attrs.get("popo.worker", "").endswith(f":{victim.proc.pid}"):
                steps = steps_logged(tmp_path / t.user_attrs["popo.output_dir"])
                if steps and 6 <= steps[-1] < 20:
                    victim.proc.send_signal(signal.SIGKILL)
                    victim.proc.wait(30)
                    dead = t.number
        time.sleep(0.05)
    storage.engine.dispose()

    assert survivor.wait() == 0, survivor.text()
    assert_no_password(victim.text(), survivor.text())
    trials = {t.number: t for t in load_trials(pg, "optuna_kill", study)}
    complete = [t for t in trials.values() if t.state.name == "COMPLETE"]
    assert len(complete) == n
    assert trials[dead].state.name == "FAIL" and not trials[dead].user_attrs.get("popo.surplus")
    (retry,) = [t for t in complete if t.system_attrs.get("failed_trial") == dead]
    assert retry.params == trials[dead].params
    assert retry.user_attrs["popo.worker"].endswith(f":{survivor.proc.pid}")
    # The retry resumed the dead trial's directory and MLflow run from its checkpoint.
    assert retry.user_attrs["popo.output_dir"] == trials[dead].user_attrs["popo.output_dir"]
    assert retry.user_attrs["popo.mlflow_run_id"] == trials[dead].user_attrs["popo.mlflow_run_id"]
    assert "(resuming)" in survivor.out.read_text()
    dirs = [tmp_path / t.user_attrs["popo.output_dir"] for t in complete]
    assert len(set(dirs)) == n and all((d / "result.json").exists() for d in dirs)
    # No other trial failed or ran twice: every FAIL besides the dead one is a surplus trial.
    assert all(t.user_attrs.get("popo.surplus") for t in trials.values() if t.state.name == "FAIL" and t.number != dead)

    _, parent, nested = study_runs(server, study)
    assert parent.info.status == "FINISHED"
    assert len(nested) == n  # the retry logged into the dead trial's run, no extra run
    assert {r.info.run_id for r in nested} == {t.user_attrs["popo.mlflow_run_id"] for t in complete}
    assert all(r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE" for r in nested)
    resumed = next(r for r in nested if r.info.run_id == retry.user_attrs["popo.mlflow_run_id"])
    assert resumed.data.tags["optuna.retry_of"] == str(dead)
    assert_runs_hold_no_password(parent, nested)
