"""MLflow tracking against a real local tracking server (``mlflow server``: SQLite backend, local
artifact store, 127.0.0.1) that this module starts: a short Ray Train + DeepSpeed run and a
template synthesis log into it, and the runs are read back through ``mlflow.MlflowClient``."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from kale_ray.config import SynthConfig, load_config

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402

from test_train import fact_rows, make_cfg, write_rows  # noqa: E402

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, proc: subprocess.Popen, uri: str, root: Path) -> None:
        self.proc, self.uri, self.root = proc, uri, root

    def ready(self) -> tuple[str, Path]:
        """Wait for ``/health`` (the server boots while Ray starts); the tracking URI and the server's folder."""
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.uri, self.root
            except OSError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(self.root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.25)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield _Server(proc, uri, root)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker (its own session)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _run(client: MlflowClient, experiment: str, name: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, runs
    return runs[0]


def test_training_logs_metrics_params_and_artifacts_to_a_real_server(mlflow_server, ray_local, tmp_path):
    from kale_ray.train.trainer import run_training

    uri, root = mlflow_server.ready()
    data = write_rows(tmp_path / "data", fact_rows(8))
    cfg = make_cfg(data, tmp_path / "out", "loss=kale", "max_steps=3", "num_workers=1", "tracking.backend=mlflow",
                   f"tracking.uri={uri}", "tracking.experiment=kale-test", "tracking.run_name=kale-3-steps")
    result = run_training(cfg, run_name="tracked")

    client = MlflowClient(uri)
    run = _run(client, "kale-test", "kale-3-steps")
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    # One point per step (rank 0 logs); the values are the job's own history.
    assert [m.step for m in loss] == [1, 2, 3]
    assert [m.value for m in loss] == pytest.approx([h["loss"] for h in result.history])
    metrics = run.data.metrics
    for key in ("train/ce", "train/kl", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s",
                "train_summary/steps", "train_summary/samples"):
        assert key in metrics, sorted(metrics)
    assert metrics["train_summary/steps"] == 3
    params = run.data.params
    assert params["loss"] == "kale" and params["lora.r"] == "8" and params["max_steps"] == "3"
    assert params["tracking.backend"] == "mlflow"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"train_summary.json", "history.jsonl"} <= artifacts
    local = client.download_artifacts(run.info.run_id, "train_summary.json", str(tmp_path / "dl"))
    assert '"steps": 3' in Path(local).read_text()
    assert list((root / "artifacts").rglob("train_summary.json"))  # stored by the server, not by us


def test_synthesis_summary_is_one_run(mlflow_server, ray_local, tmp_path):
    from kale_ray.synth.pipeline import run_synthesis

    uri, _ = mlflow_server.ready()
    cfg = load_config(SynthConfig, None, [f"out_dir={tmp_path}", "generation.backend=template", "qa.num_questions=12",
                                          "tracking.backend=mlflow", f"tracking.uri={uri}",
                                          "tracking.experiment=kale-test"])
    s = run_synthesis(cfg, progress=lambda m: None)
    client = MlflowClient(uri)
    run = _run(client, "kale-test", "synthesis")
    m = run.data.metrics
    assert m["synth/rows_in"] == s.rows_in and m["synth/rows_out"] == s.rows_out
    assert m["synth/teacher_share/template"] == 1.0 and m["synth/teacher_share"] == 0.0
    assert m["synth/seconds/total"] > 0
    for reason, n in s.rejected.items():
        assert m[f"synth/rejected/{reason}"] == n
    assert run.data.params["qa.num_questions"] == "12"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"summary.json"}


def test_demo_run_gets_every_metric_and_its_outputs_as_artifacts(mlflow_server, tmp_path, monkeypatch):
    """The demo's own tracking (its jobs are covered above): stages replaced by their outputs, to stay short."""
    import json

    from kale_ray.methods.kale import recipe as demo
    from kale_ray.config import KALEJobConfig

    uri, _ = mlflow_server.ready()
    out = tmp_path / "demo"
    metrics = {"sft": {"accuracy": 0.25}, "kale": {"accuracy": 0.5, "known_and_incorrect_rate": 0.1},
               "eval": {"kale": {"accuracy": 0.5, "n_questions": 40}}, "timings": {"total": 12.0}, "model": "m"}

    def fake_stages(cfg, progress):
        for name, text in (("report.md", "# KALE\n"), ("metrics.json", json.dumps(metrics)), ("config.yaml", "a: 1\n")):
            (out / name).write_text(text)
        (out / "plot.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        return metrics

    monkeypatch.setattr(demo, "_run_demo", fake_stages)
    out.mkdir()
    cfg = load_config(KALEJobConfig, None, [f"out={out}", "tracking.backend=mlflow", f"tracking.uri={uri}",
                                         "tracking.experiment=kale-test", "tracking.run_name=demo-x"])
    demo.run_demo(cfg, progress=lambda m: None)
    client = MlflowClient(uri)
    run = _run(client, "kale-test", "demo-x")
    assert run.data.metrics == {"sft/accuracy": 0.25, "kale/accuracy": 0.5, "kale/known_and_incorrect_rate": 0.1,
                                "eval/kale/accuracy": 0.5, "eval/kale/n_questions": 40, "timings/total": 12.0}
    assert run.data.params["train.loss"] == "kale" and run.data.params["tracking.backend"] == "mlflow"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"report.md", "plot.png", "metrics.json",
                                                                         "config.yaml"}
    # Its jobs would log as <run>/<job> into the same server and experiment.
    assert demo._job_tracking(cfg, out, "sft").run_name == "demo-x/sft"
    assert demo._job_tracking(cfg, out, "sft").uri == uri
