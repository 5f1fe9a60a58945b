"""The CLI and jobs/ expose the same jobs; a bad key exits 2 with one line, before anything starts."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kale_ray import cli
from kale_ray.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[2]
SHIMS = sorted((REPO / "jobs").glob("*.py"))


def _shim_job(path: Path) -> str:
    m = re.search(r"main\(\[\"([\w-]+)\", \*sys\.argv\[1:\]\]\)", path.read_text())
    assert m, f"{path.name} is not a shim calling kale_ray.cli.main([job, *sys.argv[1:]])"
    return m.group(1)


def test_every_jobs_file_is_a_shim_of_a_cli_job_and_every_job_has_one():
    jobs = {p.stem: _shim_job(p) for p in SHIMS}
    assert all(job in cli.JOBS for job in jobs.values()), jobs
    assert {p.stem.replace("_", "-") for p in SHIMS} == set(jobs.values())
    assert set(jobs.values()) == set(cli.JOBS) - set(cli.ALIASES)
    assert "demo" in cli.JOBS and cli.JOBS["demo"] == cli.JOBS[cli.ALIASES["demo"]]


@pytest.mark.parametrize("path", SHIMS, ids=lambda p: p.name)
def test_shims_are_short_and_carry_their_commands(path):
    text = path.read_text()
    code = text.split('"""', 2)[2]
    assert len([line for line in code.splitlines() if line.strip()]) <= 5, code
    assert f"python jobs/{path.name}" in text and "ray job submit" in text


@pytest.fixture
def no_ray(monkeypatch):
    """Any attempt to start Ray or run a job fails the test: the config error must come first."""
    import kale_ray.ray_init

    def boom(*a, **k):
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(kale_ray.ray_init, "init_ray", boom)
    for job, (cls, _) in list(cli.JOBS.items()):
        monkeypatch.setitem(cli.JOBS, job, (cls, boom))


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_bad_key_exits_2_with_one_line(job, capsys, no_ray):
    assert cli.main([job, "no_such.key=1"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"kale-ray {job}: config error: unknown key 'no_such'"], err
    assert "Traceback" not in err + out


@pytest.mark.parametrize("job", ["train", "kard", "kalm"])
def test_bad_value_exits_2(job, capsys, no_ray):
    key = {"train": "lr", "kard": "train.lr", "kalm": "train.lr"}[job]
    assert cli.main([job, f"{key}=fast"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and f"{key}: expected a number" in err, err


def test_missing_config_file_exits_2(capsys, no_ray):
    assert cli.main(["kard", "--config", "no/such/file.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_show_config_prints_every_default(job, capsys):
    assert cli.main(["show-config", job]) == 0
    cls, _ = cli.JOBS[job]
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(load_config(cls))


def test_show_config_applies_overrides_and_rejects_bad_keys(capsys):
    assert cli.main(["show-config", "train", "lr=1e-3"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["lr"] == 1e-3
    assert cli.main(["show-config", "train", "lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


@pytest.mark.parametrize("job", list(cli.JOBS))
def test_help_names_overrides_and_show_config(job, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([job, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "key.sub=value" in text and f"kale-ray show-config {job}" in text


def test_flags_are_overrides(monkeypatch):
    seen = {}
    for job in ("prepare", "demo"):
        cls, _ = cli.JOBS[job]
        monkeypatch.setitem(cli.JOBS, job, (cls, lambda cfg, args, job=job: seen.__setitem__(job, cfg)))
    assert cli.main(["prepare", "--synth", "runs/s", "--out", "runs/r", "model=builtin:x"]) == 0
    assert (seen["prepare"].synth, seen["prepare"].out, seen["prepare"].model) == ("runs/s", "runs/r", "builtin:x")
    assert cli.main(["demo", "--out", "runs/d", "eval_base=false"]) == 0
    assert seen["demo"].out == "runs/d" and seen["demo"].eval_base is False

