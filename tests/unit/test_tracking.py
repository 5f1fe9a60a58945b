"""Experiment tracking: TensorBoard event files read back with tensorboard's own reader, W&B offline
run folders, the failure policy (a bad tracker stops a job at start in one line; a failing log call
mid-run warns once and turns tracking off) and the metric helpers."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from kale_ray.config import ConfigError, KALEJobConfig, TrainConfig, load_config
from kale_ray.runtime.tracking import (
    Tracker,
    TrackingConfig,
    attach,
    flatten,
    log_summary,
    make_tracker,
    numeric,
    start_run,
    step_metrics,
    synthesis_metrics,
)


def _events(log_dir: Path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    acc.Reload()
    return acc


def _text(acc, tag: str) -> str:
    return acc.Tensors(tag)[0].tensor_proto.string_val[0].decode()


def test_tensorboard_metrics_params_artifacts_read_back(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = start_run(TrackingConfig(), tmp_path, "train", params={"lr": 0.01, "lora": {"r": 8, "target_modules": ["q"]}})
    assert t.log_dir == str(tmp_path.resolve() / "tensorboard" / "train")
    for step, loss in enumerate([2.0, 1.5, 1.2], start=1):
        t.log_metrics({"train/loss": loss, "train/ce": loss / 2, "bad": float("nan")}, step=step)
    (tmp_path / "report.md").write_text("# Report\nsft 0.5, kale 0.6\n")
    plt.figure(figsize=(2, 1)).savefig(tmp_path / "plot.png")
    t.log_artifact(tmp_path / "report.md")
    t.log_artifact(tmp_path / "plot.png")
    t.end()

    acc = _events(Path(t.log_dir))
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0), (2, 1.5), (3, pytest.approx(1.2))]
    assert [e.step for e in acc.Scalars("train/ce")] == [1, 2, 3]
    assert "bad" not in acc.Tags()["scalars"]  # non-finite values are not logged
    params = _text(acc, "params/text_summary")
    assert "| lora.r | 8 |" in params and "| lr | 0.01 |" in params and "lora.target_modules" in params
    assert "sft 0.5" in _text(acc, "report.md/text_summary")
    assert acc.Images("plot.png")[0].width == 200
    assert (Path(t.log_dir) / "artifacts" / "report.md").exists()


def test_tensorboard_attach_from_another_writer_and_purge_on_restart(tmp_path):
    driver = start_run(TrackingConfig(run_name="mine"), tmp_path, "train", params={"a": 1})
    worker = attach(driver.handle(), purge_step=1)  # rank 0 of the training workers
    for step in (1, 2, 3):
        worker.log_metrics({"train/loss": float(step)}, step=step)
    worker.close()
    time.sleep(1.1)  # TensorBoard orders event files by their (second-resolution) names
    restarted = attach(driver.handle(), purge_step=3)  # resumed from the step-2 checkpoint
    restarted.log_metrics({"train/loss": 30.0}, step=3)
    restarted.close()
    time.sleep(1.1)
    driver.log_metrics({"train_summary/steps": 3.0}, step=3)
    driver.end()
    acc = _events(tmp_path / "tensorboard" / "mine")  # tracking.run_name wins over the job's name
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert acc.Scalars("train_summary/steps")[0].value == 3.0


def test_tensorboard_uri_is_the_log_folder(tmp_path):
    t = start_run(TrackingConfig(uri=str(tmp_path / "tb")), tmp_path / "out", "synthesis")
    t.log_metrics({"synth/rows_in": 4}, step=0)
    t.end()
    assert list((tmp_path / "tb" / "synthesis").glob("events.out.tfevents.*"))
    assert not (tmp_path / "out").exists()


def test_none_writes_nothing(tmp_path):
    t = start_run(TrackingConfig(backend="none"), tmp_path, "train", params={"a": 1})
    t.log_metrics({"x": 1.0}, step=1)
    t.log_artifact(__file__)
    t.end()
    assert list(tmp_path.iterdir()) == []
    assert attach(t.handle()).backend == "none"


def test_wandb_offline_writes_its_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    t = start_run(TrackingConfig(backend="wandb", experiment="kale-test"), tmp_path, "train",
                  params={"lr": 0.01, "lora": {"r": 8}})
    worker = attach(t.handle())
    for step in (1, 2):
        worker.log_metrics({"train/loss": 1.0 / step}, step=step)
    worker.close()
    (tmp_path / "metrics.json").write_text(json.dumps({"accuracy": 0.5}))
    t.log_metrics({"eval/accuracy": 0.5}, step=3)
    t.log_artifact(tmp_path / "metrics.json")
    t.end()
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and all(r.name.endswith(t.run_id) for r in runs), runs
    records = b"".join(f.read_bytes() for r in runs for f in r.glob("run-*.wandb"))  # what `wandb sync` uploads
    for key in (b"lora.r", b"train/loss", b"eval/accuracy", b"metrics.json"):
        assert key in records, key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_mlflow_stops_at_start_in_one_line(tmp_path):
    pytest.importorskip("mlflow")
    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        start_run(TrackingConfig(backend="mlflow", uri=uri), tmp_path, "train", params={"a": 1})
    assert time.perf_counter() - t0 < 30
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"tracking.uri: cannot reach the MLflow tracking server at {uri}")


def test_cli_train_and_demo_refuse_an_unreachable_mlflow_before_any_work(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from kale_ray.cli import main
    from kale_ray.methods.kale.recipe import run_demo

    uri = f"http://127.0.0.1:{_free_port()}"
    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "part-0.jsonl").write_text(json.dumps({"prompt": "Q?", "completion": " A"}) + "\n")
    rc = main(["train", f"out_dir={tmp_path / 'out'}", f"data={tmp_path / 'rows'}", "tracking.backend=mlflow",
               f"tracking.uri={uri}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "cannot reach the MLflow tracking server" in err[0], err
    assert not (tmp_path / "out" / "ray").exists()  # nothing was started
    cfg = load_config(KALEJobConfig, None, [f"out={tmp_path / 'demo'}", "tracking.backend=mlflow", f"tracking.uri={uri}"])
    with pytest.raises(ConfigError, match="cannot reach"):
        run_demo(cfg, progress=lambda m: None)
    assert not (tmp_path / "demo" / "synth").exists()


def test_missing_package_is_a_one_line_config_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ConfigError, match="mlflow package is not installed"):
        start_run(TrackingConfig(backend="mlflow", uri="http://127.0.0.1:1"), tmp_path, "train")


def test_a_failing_log_call_mid_run_warns_once_and_turns_tracking_off(tmp_path, capsys):
    class Flaky(Tracker):
        backend = "flaky"
        calls = 0

        def _log_metrics(self, metrics, step):
            Flaky.calls += 1
            raise ConnectionError("server went away")

    t = Flaky(TrackingConfig(uri="http://x"), tmp_path, "train").start()
    for step in range(5):
        t.log_metrics({"train/loss": 1.0}, step=step)  # never raises
    t.end()
    out = capsys.readouterr().out.strip().splitlines()
    assert Flaky.calls == 1 and len(out) == 1
    assert "log_metrics failed" in out[0] and "server went away" in out[0] and "tracking is off" in out[0]


def test_log_summary_never_fails_a_finished_job(tmp_path, capsys):
    log_summary(TrackingConfig(backend="mlflow", uri=f"http://127.0.0.1:{_free_port()}"), {"rows_in": 1}, tmp_path)
    assert "summary was not logged" in capsys.readouterr().out
    summary = {"rows_in": 10, "rows_out": 8, "rejected": {"no_path": 2}, "teacher_counts": {"vllm:m": 6, "template": 2},
               "tokens_generated": 500, "seconds": {"total": 3.5, "teacher": 2.0}, "qa": {"test": 4}, "kg": {"name": "x"}}
    log_summary(TrackingConfig(), summary, tmp_path, params={"shard_size": 4})
    acc = _events(tmp_path / "tensorboard" / "synthesis")
    got = {tag: acc.Scalars(tag)[0].value for tag in acc.Tags()["scalars"]}
    assert got["synth/rows_in"] == 10 and got["synth/rejected/no_path"] == 2 and got["synth/teacher_share"] == 0.75
    assert got["synth/seconds/teacher"] == 2.0 and got["synth/tokens_generated"] == 500
    assert (tmp_path / "tensorboard" / "synthesis" / "artifacts" / "summary.json").exists()


def test_metric_helpers():
    row = {"step": 3, "epoch": 0, "loss": 1.5, "ce": 1.0, "kl": 0.5, "grad_norm": 2.0, "tokens": 40, "samples": 8,
           "lr": 1e-3, "seconds": 2.0}
    assert step_metrics(row) == {"train/loss": 1.5, "train/ce": 1.0, "train/kl": 0.5, "train/lr": 1e-3,
                                 "train/grad_norm": 2.0, "train/tokens_per_s": 20.0, "train/samples_per_s": 4.0,
                                 "train/epoch": 0.0}
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": "[1, 2]", "d": "{}"}
    assert numeric({"a": {"b": 1, "ok": True, "s": "x", "n": float("inf")}, "c": 2.5}) == {"a/b": 1.0, "c": 2.5}
    m = synthesis_metrics({"rows_in": 4, "rows_out": 2, "rejected": {"r": 2}, "teacher_counts": {"template-fallback": 2}})
    assert m["synth/teacher_share"] == 0.0 and m["synth/teacher_share/template-fallback"] == 1.0
    assert m["synth/rejected_total"] == 2


def test_config_sections_and_defaults():
    cfg = load_config(TrainConfig, None, ["tracking.backend=mlflow", "tracking.uri=http://127.0.0.1:5000",
                                          "tracking.run_name=r1"])
    assert cfg.tracking == TrackingConfig("mlflow", "http://127.0.0.1:5000", "kale_ray", "r1")
    assert load_config(KALEJobConfig).tracking.backend == "tensorboard"  # the default: files, no server
    with pytest.raises(ConfigError, match="tracking.backend: expected one of"):
        load_config(TrainConfig, None, ["tracking.backend=neptune"])
    assert make_tracker(None, None, "x").backend == "none"


def test_tracking_is_not_part_of_a_stage_settings(tmp_path):
    from kale_ray.config import SynthConfig
    from kale_ray.synth.pipeline import synthesis_settings
    from kale_ray.train.trainer import training_stage

    a = load_config(TrainConfig, None, [f"out_dir={tmp_path}"])
    b = load_config(TrainConfig, None, [f"out_dir={tmp_path}", "tracking.backend=mlflow"])
    assert training_stage(a).hash == training_stage(b).hash
    s = load_config(SynthConfig, None, ["tracking.backend=none"])
    assert "tracking" not in synthesis_settings(s)


def test_mlflow_default_store_is_a_sqlite_file_in_out_dir(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    out = tmp_path / "out"
    t = start_run(TrackingConfig(backend="mlflow"), out, "train", params={"lora": {"r": 8}})
    t.log_metrics({"train/loss": 2.0}, step=1)
    t.log_metrics({"train/loss": 1.0}, step=2)
    (tmp_path / "report.md").write_text("# r\n")
    t.log_artifact(tmp_path / "report.md")
    t.end()
    assert t.uri == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    client = MlflowClient(t.uri)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lora.r": "8"}
    assert [m.value for m in client.get_metric_history(t.run_id, "train/loss")] == [2.0, 1.0]
    assert list((out / "mlartifacts").rglob("report.md")) and not list((tmp_path / "cwd").iterdir())
