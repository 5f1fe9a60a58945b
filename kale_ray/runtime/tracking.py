"""Experiment tracking through the trackers' own clients: TensorBoard (default), MLflow, W&B.

    tracking.backend=tensorboard     event files under <out_dir>/tensorboard/<run_name> (no server, no extra package:
                                     torch.utils.tensorboard when `tensorboard` is installed, else tensorboardX)
    tracking.backend=mlflow          mlflow.MlflowClient against tracking.uri (http://host:port, sqlite:///..., ...)
    tracking.backend=wandb           wandb.init; WANDB_MODE=offline writes <out_dir>/wandb/offline-run-* (`wandb sync`)
    tracking.backend=none            nothing

A job opens its run in the driver with :func:`start_run` (params = the flattened config). A bad
tracker (an unreachable MLflow server, a missing package) stops the job there, before any work,
with one line (a :class:`~kale_ray.config.ConfigError` naming ``tracking.*``). Another process
(rank 0 of the Ray Train workers) logs into the same run with :func:`attach` and the run's
:meth:`Tracker.handle`. Once a run has started, a failing log call never stops the job: it prints
one warning line and the tracker turns itself off for the rest of the run.

Every client library is imported lazily: ``none`` and ``tensorboard`` need nothing beyond the
base install (tensorboardX comes with Ray Train). Extras: ``pip install 'kale-ray[tracking]'``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

BACKENDS = ("none", "tensorboard", "mlflow", "wandb")


@dataclasses.dataclass
class TrackingConfig:
    """Where a job's metrics, params (its config) and artifacts go."""

    backend: Literal["none", "tensorboard", "mlflow", "wandb"] = "tensorboard"
    # mlflow: the tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///<out_dir>/mlflow.db);
    # tensorboard: the log folder (default <out_dir>/tensorboard); wandb: the server URL (default W&B's own).
    uri: str | None = None
    experiment: str = "kale_ray"  # MLflow experiment / W&B project
    run_name: str | None = None  # default: the job's name (train, synthesis, demo, ...)


def _config_error(msg: str) -> Exception:
    from kale_ray.config import ConfigError  # lazily: kale_ray.config imports this module

    return ConfigError(msg)


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def flatten(tree: Any, prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": 1, "c": "[1, 2]"}`` (lists as text)."""
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            key = f"{prefix}{sep}{k}" if prefix else str(k)
            out.update(flatten(v, key, sep) if isinstance(v, dict) and v else {key: v})
    else:
        out[prefix] = tree
    return {k: (str(v) if isinstance(v, (list, tuple, dict)) else v) for k, v in out.items()}


def numeric(tree: Any, prefix: str = "", sep: str = "/") -> dict[str, float]:
    """The finite numeric leaves of a nested dict, flattened (bools and text left out)."""
    out: dict[str, float] = {}
    for k, v in flatten(tree, prefix, sep).items() if isinstance(tree, dict) else []:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[k] = float(v)
    return out


# Keys of a training history row that are not loss parts.
_STEP_KEYS = ("step", "epoch", "tokens", "samples", "seconds", "lr", "grad_norm")


def step_metrics(row: dict) -> dict[str, float]:
    """One training step's metrics from its history row: loss and its parts, lr, grad norm, tokens/s, samples/s."""
    m = {f"train/{k}": float(v) for k, v in row.items()
         if k not in _STEP_KEYS and isinstance(v, (int, float)) and not isinstance(v, bool)}
    m["train/lr"] = float(row["lr"])
    if row.get("grad_norm") is not None:
        m["train/grad_norm"] = float(row["grad_norm"])
    seconds = float(row.get("seconds") or 0.0)
    if seconds > 0:
        m["train/tokens_per_s"] = row.get("tokens", 0) / seconds
        m["train/samples_per_s"] = row.get("samples", 0) / seconds
    m["train/epoch"] = float(row.get("epoch", 0))
    return m


def synthesis_metrics(summary: dict) -> dict[str, float]:
    """A synthesis summary.json as metrics: rows in/out, rejects by reason, teacher share, tokens, seconds per stage."""
    m = numeric(summary, "synth")
    rows_out = summary.get("rows_out") or 0
    m["synth/rejected_total"] = float(sum((summary.get("rejected") or {}).values()))
    if rows_out:
        counts = summary.get("teacher_counts") or {}
        for label, n in counts.items():
            m[f"synth/teacher_share/{label}"] = n / rows_out
        # Rows whose rationale the teacher wrote (not the exact template, not the template fallback).
        m["synth/teacher_share"] = sum(n for label, n in counts.items() if not label.startswith("template")) / rows_out
    return m


# --------------------------------------------------------------------------- the trackers


class Tracker:
    """One run of one tracker. ``none`` is this base class: every call does nothing."""

    backend = "none"

    def __init__(self, cfg: TrackingConfig, out_dir: str | Path | None, run_name: str) -> None:
        self.cfg, self.run_name = cfg, run_name
        self.out_dir = str(out_dir) if out_dir is not None else None
        self.run_id: str | None = None
        self.active = False

    # -- what a job calls
    def start(self, params: dict | None = None) -> "Tracker":
        """Open the run and log ``params`` (a nested config dict is flattened). Raises ConfigError on a bad tracker."""
        from kale_ray.config import ConfigError

        try:
            self._start(flatten(params or {}))
        except ConfigError:
            raise
        except Exception as e:
            raise _config_error(f"tracking.backend={self.backend}: cannot start a run "
                                f"({self._where()}): {_one_line(e)}") from e
        self.active = True
        return self

    def log_params(self, params: dict) -> None:
        self._guard("log_params", self._log_params, flatten(params))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
        if clean:
            self._guard("log_metrics", self._log_metrics, clean, step)

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).exists():
            self._guard("log_artifact", self._log_artifact, str(path))

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run finished (or FAILED) and release the client."""
        if self.active:
            self._guard("end", self._end, status)
            self.active = False

    def close(self) -> None:
        """Release this process's client, leaving the run open (a worker, when the driver ends the run)."""
        if self.active:
            self._guard("close", self._close)
            self.active = False

    def handle(self) -> dict:
        """What another process needs to log into this run (:func:`attach`)."""
        return {"cfg": dataclasses.asdict(self.cfg), "out_dir": self.out_dir, "run_name": self.run_name,
                "run_id": self.run_id, "backend": self.backend}

    # -- failure policy: a started run never stops the job
    def _guard(self, what: str, fn, *args) -> None:
        if not self.active:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - tracking must not end a training run
            self.active = False
            print(f"[kale_ray.tracking] {self.backend} {what} failed ({self._where()}): {_one_line(e)}; "
                  "tracking is off for the rest of this run", flush=True)

    def _where(self) -> str:
        return f"uri={self.cfg.uri}" if self.cfg.uri else f"run {self.run_name}"

    # -- per backend
    def _start(self, params: dict) -> None:
        pass

    def _reopen(self, purge_step: int | None = None) -> None:
        pass

    def _log_params(self, params: dict) -> None:
        pass

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        pass

    def _log_artifact(self, path: str) -> None:
        pass

    def _end(self, status: str) -> None:
        pass

    def _close(self) -> None:
        self._end("FINISHED")


class TensorBoardTracker(Tracker):
    backend = "tensorboard"

    @property
    def log_dir(self) -> str:
        if self.cfg.uri:
            root = self.cfg.uri[len("file://"):] if self.cfg.uri.startswith("file://") else self.cfg.uri
        else:
            if self.out_dir is None or "://" in self.out_dir and not self.out_dir.startswith("file://"):
                raise _config_error("tracking.uri: tensorboard writes to a local folder; set tracking.uri=FOLDER "
                                    f"(out_dir {self.out_dir!r} is not one)")
            root = os.path.join(self.out_dir.removeprefix("file://"), "tensorboard")
        return str(Path(root).expanduser().resolve() / self.run_name)

    def _writer(self, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` package
        except ImportError:
            from tensorboardX import SummaryWriter
        Path(self.log_dir).mkdir(parents=True, exist_ok=True)
        return SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)

    writer = None

    def _start(self, params: dict) -> None:
        self.run_id = self.log_dir
        if params:
            self._log_params(params)
        # Each process writes its own event file; the driver's is closed while the workers write
        # theirs (a restarted worker's purge_step must not drop what the driver logs at the end).
        self._end("FINISHED")

    def _reopen(self, purge_step: int | None = None) -> None:
        self.writer = self._writer(purge_step)

    def _open(self):
        if self.writer is None:
            self.writer = self._writer()
        return self.writer

    def _log_params(self, params: dict) -> None:
        rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in params.items())
        self._open().add_text("params", "| key | value |\n|---|---|\n" + rows, global_step=0)

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        w = self._open()
        for k, v in metrics.items():
            w.add_scalar(k, v, global_step=step)
        w.flush()

    def _log_artifact(self, path: str) -> None:
        p = Path(path)
        dest = Path(self.log_dir) / "artifacts"
        dest.mkdir(parents=True, exist_ok=True)
        if p.is_dir():
            shutil.copytree(p, dest / p.name, dirs_exist_ok=True)
            return
        shutil.copy2(p, dest / p.name)
        w = self._open()
        if p.suffix in (".md", ".txt"):
            w.add_text(p.name, p.read_text(errors="replace")[:200_000], global_step=0)
        elif p.suffix == ".json":
            w.add_text(p.name, "```\n" + p.read_text(errors="replace")[:200_000] + "\n```", global_step=0)
        elif p.suffix == ".png":
            import matplotlib.image

            img = matplotlib.image.imread(str(p))
            w.add_image(p.name, img[..., :3] if img.ndim == 3 else img,
                                  global_step=0, dataformats="HWC" if img.ndim == 3 else "HW")
        w.flush()

    def _end(self, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@contextlib.contextmanager
def _mlflow_http(retries: int, timeout: int) -> Iterator[None]:
    """MLflow's HTTP retry/timeout settings for the calls inside (it reads them per request)."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    old = {k: os.environ.get(k) for k in keys}
    for k, v in keys.items():
        if old[k] is None:  # a user's own setting wins
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)


def _mlflow_key(key: str) -> str:
    """MLflow names: letters, digits, ``_ - . / :`` and spaces; anything else becomes ``_``."""
    return re.sub(r"[^\w\-./: ]", "_", key)[:250]


def _artifact_location(uri: str) -> str | None:
    """A SQLite store keeps its artifacts beside the database (MLflow's default is ./mlruns of the cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None  # a server decides (--default-artifact-root / --artifacts-destination)


class MLflowTracker(Tracker):
    backend = "mlflow"

    def _uri(self) -> str:
        uri = self.cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            if self.out_dir is None or "://" in self.out_dir and not self.out_dir.startswith("file://"):
                raise _config_error("tracking.uri: set an MLflow tracking URI (out_dir is not a local folder)")
            # MLflow's file store is in maintenance mode (3.x refuses it): a SQLite file, as `mlflow ui` expects.
            uri = f"sqlite:///{Path(self.out_dir.removeprefix('file://')).expanduser().resolve() / 'mlflow.db'}"
        return uri

    def _client(self):
        try:
            from mlflow import MlflowClient
        except ImportError as e:
            raise _config_error("tracking.backend=mlflow: the mlflow package is not installed "
                                "(pip install 'kale-ray[tracking]' or mlflow-skinny)") from e
        self.uri = self._uri()
        return MlflowClient(tracking_uri=self.uri)

    def _where(self) -> str:
        return f"uri={getattr(self, 'uri', None) or self.cfg.uri}"

    def _start(self, params: dict) -> None:
        self.client = self._client()
        # Fail fast: one try with a short timeout (MLflow's default retries an unreachable server for minutes).
        with _mlflow_http(retries=0, timeout=10):
            try:
                exp = self.client.get_experiment_by_name(self.cfg.experiment)
                exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                    self.cfg.experiment, artifact_location=_artifact_location(self.uri))
                run = self.client.create_run(exp_id, run_name=self.run_name, tags={"kale_ray.job": self.run_name})
            except Exception as e:
                raise _config_error(f"tracking.uri: cannot reach the MLflow tracking server at {self.uri}: "
                                    f"{_one_line(e, 200)}") from e
        self.run_id = run.info.run_id
        self.active = True
        if params:
            self._log_params(params)

    def _reopen(self, purge_step: int | None = None) -> None:
        self.client = self._client()

    def _log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        # MLflow keeps a param's first value; values are text of at most 6000 characters.
        with _mlflow_http(retries=2, timeout=30):
            self.client.log_batch(self.run_id, params=[Param(_mlflow_key(k), str(v)[:6000]) for k, v in params.items()])

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with _mlflow_http(retries=2, timeout=30):
            self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, ts, step or 0)
                                                        for k, v in metrics.items()])

    def _log_artifact(self, path: str) -> None:
        with _mlflow_http(retries=2, timeout=60):
            if Path(path).is_dir():
                self.client.log_artifacts(self.run_id, path, artifact_path=Path(path).name)
            else:
                self.client.log_artifact(self.run_id, path)

    def _end(self, status: str) -> None:
        with _mlflow_http(retries=2, timeout=30):
            self.client.set_terminated(self.run_id, status=status)

    def _close(self) -> None:
        pass


class WandbTracker(Tracker):
    backend = "wandb"

    def _wandb(self):
        try:
            import wandb
        except ImportError as e:
            raise _config_error("tracking.backend=wandb: the wandb package is not installed "
                                "(pip install 'kale-ray[tracking]')") from e
        return wandb

    def _dir(self) -> str:
        if self.out_dir is None or "://" in self.out_dir and not self.out_dir.startswith("file://"):
            d = Path(tempfile.gettempdir()) / "kale_ray_wandb"
        else:
            d = Path(self.out_dir.removeprefix("file://")).expanduser().resolve()
        d.mkdir(parents=True, exist_ok=True)
        return str(d)

    run = None

    def _init(self, config: dict | None):
        wandb = self._wandb()
        settings = wandb.Settings(base_url=self.cfg.uri) if self.cfg.uri else None
        # WANDB_MODE (offline / disabled) is read by wandb itself; resume="allow" reopens the same run id.
        self.run = wandb.init(project=self.cfg.experiment, name=self.run_name, id=self.run_id, resume="allow",
                              dir=self._dir(), config=config, settings=settings, reinit="create_new")

    def _start(self, params: dict) -> None:
        wandb = self._wandb()
        mode = os.environ.get("WANDB_MODE", "")
        if mode not in ("offline", "disabled", "dryrun") and not os.environ.get("WANDB_API_KEY"):
            try:
                ok = wandb.login(verify=False, relogin=False)
            except Exception as e:
                raise _config_error(f"tracking.backend=wandb: no W&B login ({_one_line(e, 200)}); set "
                                    "WANDB_API_KEY, or WANDB_MODE=offline to write the run locally") from e
            if not ok:
                raise _config_error("tracking.backend=wandb: no W&B login; set WANDB_API_KEY, or WANDB_MODE=offline")
        self.run_id = uuid.uuid4().hex[:12]  # a W&B run id, shared with the processes that attach
        self._init(params)
        # One process writes a W&B run at a time: the driver lets go until it logs again
        # (rank 0 of the training workers reopens the same id meanwhile).
        self.run.finish()
        self.run = None

    def _reopen(self, purge_step: int | None = None) -> None:
        self._init(None)

    def _open(self):
        if self.run is None:
            self._init(None)
        return self.run

    def _log_params(self, params: dict) -> None:
        self._open().config.update(params, allow_val_change=True)

    def _log_metrics(self, metrics: dict[str, float], step: int | None) -> None:
        self._open()
        if step is None:
            self.run.log(metrics)
        else:
            self.run.log(metrics, step=step)

    def _log_artifact(self, path: str) -> None:
        wandb = self._wandb()
        name = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{self.run_name}-{Path(path).name}")
        art = wandb.Artifact(name, type="kale_ray")
        if Path(path).is_dir():
            art.add_dir(path)
        else:
            art.add_file(path)
        self._open().log_artifact(art)

    def _end(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None


_CLASSES: dict[str, type[Tracker]] = {"none": Tracker, "tensorboard": TensorBoardTracker,
                                      "mlflow": MLflowTracker, "wandb": WandbTracker}


def make_tracker(cfg: TrackingConfig | dict | None, out_dir: str | Path | None, run_name: str) -> Tracker:
    """A tracker for ``cfg`` (not started); ``cfg.run_name`` wins over the job's ``run_name``."""
    if cfg is None:
        cfg = TrackingConfig(backend="none")
    if isinstance(cfg, dict):
        cfg = TrackingConfig(**cfg)
    if cfg.backend not in _CLASSES:
        raise _config_error(f"tracking.backend: expected one of {list(BACKENDS)}, got {cfg.backend!r}")
    return _CLASSES[cfg.backend](cfg, out_dir, cfg.run_name or run_name)


def start_run(cfg: TrackingConfig | None, out_dir: str | Path | None, run_name: str,
              params: dict | None = None) -> Tracker:
    """Open a run and log ``params``; a tracker that cannot start raises one-line ConfigError (before any work)."""
    return make_tracker(cfg, out_dir, run_name).start(params)


def attach(handle: dict | None, purge_step: int | None = None) -> Tracker:
    """Log into a run started elsewhere (``Tracker.handle()``). A failure to reopen warns and turns tracking off."""
    if not handle or handle.get("backend", "none") == "none":
        return Tracker(TrackingConfig(backend="none"), None, "none")
    t = make_tracker(handle["cfg"], handle["out_dir"], handle["run_name"])
    t.run_name, t.run_id = handle["run_name"], handle["run_id"]
    t.active = True
    t._guard("attach", t._reopen, purge_step)
    return t


def log_summary(cfg: TrackingConfig | None, summary: dict, out_dir: str | Path | None,
                run_name: str = "synthesis", params: dict | None = None) -> None:
    """A finished synthesis job in one call: its summary as metrics, summary.json as an artifact.

    Called after the outputs are written: a tracker that fails here prints one line and the job's
    result stands.
    """
    if cfg is None or cfg.backend == "none":
        return
    try:
        t = start_run(cfg, out_dir, run_name, params)
    except Exception as e:  # noqa: BLE001 - the synthesis outputs are already complete
        print(f"[kale_ray.tracking] {_one_line(e)}; the synthesis summary was not logged", flush=True)
        return
    t.log_metrics(synthesis_metrics(summary), step=0)
    with tempfile.TemporaryDirectory(prefix="kale_track_") as d:
        import json

        p = Path(d) / "summary.json"
        p.write_text(json.dumps(summary, indent=2, default=str))
        t.log_artifact(p)
    t.end()
