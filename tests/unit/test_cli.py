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
    import kale_ray.runtime.ray

    def boom(*a, **k):
        raise AssertionError("started before the config was checked")

    monkeypatch.setattr(kale_ray.runtime.ray, "init_ray", boom)
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


def test_flags_are_overrides(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the preflight checks runs/s exists and creates (probes) runs/r, runs/d here
    (tmp_path / "runs" / "s").mkdir(parents=True)
    seen = {}
    for job in ("prepare", "demo"):
        cls, _ = cli.JOBS[job]
        monkeypatch.setitem(cli.JOBS, job, (cls, lambda cfg, args, job=job: seen.__setitem__(job, cfg)))
    assert cli.main(["prepare", "--synth", "runs/s", "--out", "runs/r", "model=builtin:x"]) == 0
    assert (seen["prepare"].synth, seen["prepare"].out, seen["prepare"].model) == ("runs/s", "runs/r", "builtin:x")
    assert cli.main(["demo", "--out", "runs/d", "eval_base=false"]) == 0
    assert seen["demo"].out == "runs/d" and seen["demo"].eval_base is False



# --------------------------------------------------------------------------- bad input: one line, exit 2, before Ray
KALE_RAY = REPO / ".venv" / "bin" / "kale-ray"


def _cli(*args: str, cwd: Path, timeout: float = 60):
    """Run the installed ``kale-ray`` in a subprocess: (exit code, stdout, stderr, seconds)."""
    import subprocess
    import time

    t = time.monotonic()
    p = subprocess.run([str(KALE_RAY), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr, time.monotonic() - t


def _bad_kg(tmp_path: Path) -> Path:
    kg = tmp_path / "kg.tsv"
    kg.write_text("alice\tknows\tbob\ncarol\tknows\n")
    return kg


@pytest.mark.parametrize("case", ["missing_kg", "missing_qa", "bad_kg_line", "out_dir_in_proc", "out_dir_below_a_file",
                                  "shard_size_0"])
def test_synthesize_bad_input_is_one_line_exit_2_before_ray(case, tmp_path):
    (tmp_path / "afile").write_text("x")
    out = f"out_dir={tmp_path / 'out'}"
    args, named = {
        "missing_kg": (["kg.source=/nonexistent/kg.tsv", out], "/nonexistent/kg.tsv"),
        "missing_qa": (["qa.source=/nonexistent/qa.jsonl", out], "/nonexistent/qa.jsonl"),
        "bad_kg_line": ([f"kg.source={_bad_kg(tmp_path)}", out], f"{tmp_path / 'kg.tsv'}:2:"),
        "out_dir_in_proc": (["out_dir=/proc/x"], "/proc/x"),
        "out_dir_below_a_file": ([f"out_dir={tmp_path / 'afile' / 'sub'}"], str(tmp_path / "afile" / "sub")),
        "shard_size_0": (["shard_size=0", out], "shard_size: must be >= 1, got 0"),
    }[case]
    rc, stdout, stderr, seconds = _cli("synthesize", *args, cwd=tmp_path)
    assert rc == 2, (stdout, stderr)
    assert len(stderr.splitlines()) == 1 and stderr.startswith("kale-ray synthesize: ") and named in stderr, stderr
    assert "Traceback" not in stderr + stdout
    # Ray never started: cli._ray prints "[job] <job>: <where>" once it has; Ray logs "Started a local Ray instance".
    assert "[job]" not in stdout and "Ray instance" not in stderr + stdout and seconds < 10, (stdout, seconds)


def test_debug_shows_the_traceback_and_still_exits_2(tmp_path):
    rc, _, stderr, _ = _cli("synthesize", f"kg.source={_bad_kg(tmp_path)}", f"out_dir={tmp_path / 'out'}", "--debug",
                            cwd=tmp_path)
    assert rc == 2 and "Traceback" in stderr and "KGFormatError" in stderr
    assert stderr.splitlines()[-1].startswith(f"kale-ray synthesize: {tmp_path / 'kg.tsv'}:2: ")


@pytest.mark.parametrize("path", SHIMS, ids=lambda p: p.name)
def test_every_shim_shares_the_error_handling(path, tmp_path):
    import subprocess

    p = subprocess.run([str(REPO / ".venv" / "bin" / "python"), str(path), "no_such.key=1"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.splitlines() == [
        f"kale-ray {_shim_job(path)}: config error: unknown key 'no_such'"], p.stderr


@pytest.mark.parametrize("job,override,named", [
    ("kale", "synth.kg.source=/nonexistent.tsv", "synth.kg.source: no such file or folder: /nonexistent.tsv"),
    ("kalm", "data.kg.source=/nonexistent.tsv", "data.kg.source: no such file or folder"),
    ("kard", "kg.names=/nonexistent.tsv", "kg.names: no such file or folder"),
    ("kard", "kb.sources=[builtin:kg, /nonexistent.jsonl]", "kb.sources[1]: no such file or folder"),
    ("knowtuning", "qa.source=/nonexistent.jsonl", "qa.source: no such file or folder"),
    ("knowtuning-dpo", "pairs.source=/nonexistent.jsonl", "pairs.source: no such file or folder"),
    ("train", "data=/nonexistent/rows", "data: no such file or folder"),
    ("evaluate", "data=/nonexistent/test.jsonl", "data: no such file or folder"),
    ("prepare", "synth=/nonexistent/synth", "synth: no such file or folder"),
    ("synthesize", "qa.test_file=t.jsonl", "qa.test_file: read only when qa.source is a QA file"),
])
def test_every_job_checks_its_inputs_before_running(job, override, named, capsys, no_ray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main([job, override]) == 2  # no_ray: the run (and Ray) would raise if reached
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and named in err, err


def test_out_dir_checked_for_every_job(capsys, no_ray, tmp_path):
    (tmp_path / "afile").write_text("x")
    for job in ("kale", "kalm", "kard", "knowtuning", "knowtuning-dpo", "synthesize"):
        key = "out_dir" if job == "synthesize" else "out"
        assert cli.main([job, f"{key}={tmp_path / 'afile' / 'sub'}"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and f"{key} '{tmp_path / 'afile' / 'sub'}': not writable" in err, err


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def buggy(cfg, args):
        return 1 / 0

    monkeypatch.setitem(cli.JOBS, "synthesize", (cli.JOBS["synthesize"][0], buggy))
    with pytest.raises(ZeroDivisionError):
        cli.main(["synthesize", f"out_dir={tmp_path / 'out'}"])


def test_input_errors_inside_ray_tasks_are_unwrapped(monkeypatch, tmp_path, capsys):
    from ray.exceptions import RayTaskError

    from kale_ray.core.kg import KGFormatError

    cause = KGFormatError("kg.tsv:11: expected 3 columns (head, relation, tail), got 2")
    wrapped = RayTaskError("read_shard", "Traceback (most recent call last):\n  File x\nKGFormatError: ...", cause)
    for e in (wrapped, wrapped.as_instanceof_cause()):
        assert cli.input_error(e) is cause

        def run(cfg, args, e=e):
            raise e

        monkeypatch.setitem(cli.JOBS, "synthesize", (cli.JOBS["synthesize"][0], run))
        assert cli.main(["synthesize", f"out_dir={tmp_path / 'out'}"]) == 2
        assert capsys.readouterr().err.splitlines() == [f"kale-ray synthesize: {cause}"]
    assert cli.input_error(RayTaskError("f", "tb", ZeroDivisionError("x"))) is None


def test_print_config_prints_the_resolved_config_without_checking_inputs(capsys, no_ray):
    assert cli.main(["synthesize", "kg.source=/nonexistent.tsv", "qa.num_questions=7", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["kg"]["source"] == "/nonexistent.tsv" and cfg["qa"]["num_questions"] == 7


@pytest.mark.parametrize("job,kg_key", [("synthesize", "kg.source"), ("demo", "synth.kg.source"),
                                        ("kard", "kg.source"), ("kalm", "data.kg.source"),
                                        ("knowtuning", "qa.kg.source"), ("knowtuning-dpo", "pairs.kg.source")])
def test_help_shows_the_jobs_own_key_nesting(job, kg_key, capsys):
    with pytest.raises(SystemExit):
        cli.main([job, "--help"])
    out = capsys.readouterr().out
    assert f"kale-ray {job} {kg_key}=my_kg.tsv" in out and "--print-config" in out and "--debug" in out
    cfg = load_config(cli.JOBS[job][0], None, [f"{kg_key}=my_kg.tsv"])  # the example key is a real key
    assert "my_kg.tsv" in yaml.safe_dump(to_dict(cfg))


def test_synthesize_into_a_folder_made_with_other_settings_is_refused_before_ray(tmp_path):
    """The stage's settings record is compared by the preflight: one line, exit 2, Ray never started,
    and the earlier record untouched."""
    from kale_ray.config import SynthConfig, load_config
    from kale_ray.runtime.stages import Stage
    from kale_ray.runtime.storage import Storage
    from kale_ray.synth.pipeline import synthesis_settings

    out = tmp_path / "synth"
    base = [f"out_dir={out}", "generation.backend=template", "qa.num_questions=20"]
    Stage(Storage.from_uri(str(out)), "synthesis", synthesis_settings(load_config(SynthConfig, None, base))).claim()
    record = (out / "stages" / "synthesis.json").read_text()
    rc, stdout, stderr, seconds = _cli("synthesize", *base[:-1], "qa.num_questions=30", cwd=tmp_path)
    assert rc == 2, (stdout, stderr)
    assert len(stderr.splitlines()) == 1 and "qa.num_questions: 20 -> 30" in stderr and "on_change=overwrite" in stderr
    assert "[job]" not in stdout and "Ray instance" not in stderr + stdout and seconds < 10, (stdout, seconds)
    assert (out / "stages" / "synthesis.json").read_text() == record


def test_kale_job_prints_its_summary_line(monkeypatch, capsys, tmp_path):
    """The job's last line: results, report and the minutes of this run (Run.timings' total_this_run)."""
    import argparse
    import json

    import kale_ray.methods.kale.recipe as recipe
    import kale_ray.runtime.ray
    from kale_ray.config import KALEJobConfig

    monkeypatch.setattr(kale_ray.runtime.ray, "init_ray", lambda *a, **k: "no Ray")
    monkeypatch.setattr(recipe, "run_demo", lambda cfg: {"sft": {"accuracy": 0.5}, "kale": {"accuracy": 0.6},
                                                         "timings": {"train.sft": 30.0, "total_this_run": 90.0}})
    cli.run_kale(KALEJobConfig(out=str(tmp_path)), argparse.Namespace())
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out["minutes"] == 1.5 and out["kale"] == {"accuracy": 0.6} and out["report"].endswith("report.md")
