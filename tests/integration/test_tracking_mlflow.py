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
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri, root
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

    uri, root = mlflow_server
    data = write_rows(tmp_path / "data", fact_rows(8))
    cfg = make_cfg(data, tmp_path / "out", "loss=kale", "max_steps=3", "tracking.backend=mlflow",
                   f"tracking.uri={uri}", "tracking.experiment=kale-test", "tracking.run_name=kale-3-steps")
    result = run_training(cfg, run_name="tracked")

    client = MlflowClient(uri)
    run = _run(client, "kale-test", "kale-3-steps")
    assert run.info.status == "FINISHED"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    # Rank 0 alone logs each step (two workers, one point per step); the values are the job's own history.
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

    uri, _ = mlflow_server
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
