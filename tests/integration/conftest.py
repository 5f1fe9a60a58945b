"""Integration tests share one process: each module starts from no Ray connection and
leaves none behind, so a module never inherits another's cluster size or a dead cluster."""
from __future__ import annotations

import pytest


def _shutdown_ray() -> None:
    try:
        import ray
    except ImportError:
        return
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(autouse=True, scope="module")
def fresh_ray_per_module():
    _shutdown_ray()
    yield
    _shutdown_ray()


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for one module: 4 logical CPUs (2 train workers + Ray Data), no dashboard."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def _s3_server_process():
    """One moto S3 server (a real HTTP S3 API) on 127.0.0.1 for a module."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] not installed (dev extra)")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_server(_s3_server_process, monkeypatch):
    """Endpoint URL of a local S3-compatible server with bucket ``bucket``; sets AWS_ENDPOINT_URL, fake
    credentials and region in os.environ (so subprocesses / local Ray workers started now inherit them)."""
    endpoint = _s3_server_process
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region="us-east-1",
                           access_key="testing", secret_key="testing", allow_bucket_creation=True)
    fs.create_dir("bucket")  # idempotent against moto (bucket exists -> ok)
    yield endpoint
