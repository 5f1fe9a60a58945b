"""runtime.stages.Run: the one stage mechanism of every recipe (reuse, resume, refuse, recompute). Pure, ms."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from kale_ray.runtime.stages import Run, StaleOutputError


@dataclass
class Cfg:
    n: int = 3
    k: int = 1
    extra: dict = field(default_factory=dict)


def _recipe(out, cfg: Cfg, calls: list[str], on_change="error", stop_after=None):
    """A two-stage recipe: 'rows' writes n rows; 'total' sums them (depends on rows)."""
    run = Run(out, cfg, on_change=on_change, stop_after=stop_after)

    def rows():
        calls.append("rows")
        (out / "rows").mkdir(exist_ok=True)
        (out / "rows" / "data.jsonl").write_text("".join(json.dumps({"x": i * cfg.k}) + "\n" for i in range(cfg.n)))
        return {"rows": cfg.n}

    def total():
        calls.append("total")
        xs = [json.loads(x)["x"] for x in (out / "rows" / "data.jsonl").read_text().splitlines()]
        (out / "total.json").write_text(json.dumps(sum(xs)))
        return {"total": sum(xs)}

    r = run.stage("rows", rows, settings={"n": cfg.n, "k": cfg.k}, outputs=["rows"])
    if run.stops_after("rows"):
        return run, r, None
    t = run.stage("total", total, settings={}, outputs=["total.json"])
    return run, r, t


def test_same_settings_reuse_every_stage_and_return_recorded_results(tmp_path):
    calls: list[str] = []
    _recipe(tmp_path, Cfg(), calls)
    run, r, t = _recipe(tmp_path, Cfg(), calls)
    assert calls == ["rows", "total"]
    assert run.reused == ["rows", "total"] and r == {"rows": 3} and t == {"total": 3}
    assert set(run.timings()) == {"rows", "total", "total_this_run"}


def test_changed_setting_refuses_before_writing_and_names_the_key(tmp_path):
    calls: list[str] = []
    _recipe(tmp_path, Cfg(), calls)
    before = (tmp_path / "rows" / "data.jsonl").read_text()
    config_before = (tmp_path / "config.yaml").read_text()
    with pytest.raises(StaleOutputError, match=r"settings\.k: 1 -> 2.*on_change=overwrite"):
        _recipe(tmp_path, Cfg(k=2), calls)
    assert calls == ["rows", "total"]
    assert (tmp_path / "rows" / "data.jsonl").read_text() == before
    assert (tmp_path / "config.yaml").read_text() == config_before  # still describes the data beside it


def test_overwrite_recomputes_the_changed_stage_and_everything_after_it(tmp_path):
    calls: list[str] = []
    _recipe(tmp_path, Cfg(), calls)
    (tmp_path / "rows" / "stale_leftover.txt").write_text("old")
    run, r, t = _recipe(tmp_path, Cfg(k=2), calls, on_change="overwrite")
    assert calls == ["rows", "total", "rows", "total"]  # 'total' reruns: its input changed
    assert t == {"total": 6} and not (tmp_path / "rows" / "stale_leftover.txt").exists()
    assert "k: 2" in (tmp_path / "config.yaml").read_text()


def test_a_changed_upstream_stage_refuses_a_later_one_too(tmp_path):
    calls: list[str] = []
    _recipe(tmp_path, Cfg(), calls)
    # rows redone by hand under new settings (a stage record rewritten): 'total' must not reuse its old sum
    _recipe(tmp_path, Cfg(k=5), calls, on_change="overwrite", stop_after="rows")
    with pytest.raises(StaleOutputError, match="total.*upstream"):
        _recipe(tmp_path, Cfg(k=5), calls)


def test_a_killed_stage_runs_again_and_a_legacy_folder_is_refused(tmp_path):
    calls: list[str] = []
    run = Run(tmp_path, Cfg())
    with pytest.raises(KeyboardInterrupt):
        run.stage("rows", lambda: (_ for _ in ()).throw(KeyboardInterrupt()), settings={"n": 3}, outputs=["rows"])
    again = Run(tmp_path, Cfg())
    assert again.stage("rows", lambda: calls.append("rows") or {"ok": 1}, settings={"n": 3}, outputs=["rows"]) == {"ok": 1}
    assert calls == ["rows"] and again.ran == ["rows"]
    legacy = tmp_path / "legacy"
    (legacy / "rows").mkdir(parents=True)
    with pytest.raises(StaleOutputError, match="without a settings record"):
        Run(legacy).stage("rows", dict, settings={}, outputs=["rows"])


def test_input_file_identity_is_part_of_the_settings(tmp_path):
    src = tmp_path / "qa.jsonl"
    src.write_text('{"a": 1}\n')
    out = tmp_path / "out"
    Run(out).stage("qa", dict, settings={}, content_inputs=[src])
    src.write_text('{"a": 2}\n')
    with pytest.raises(StaleOutputError, match="inputs"):
        Run(out).stage("qa", dict, settings={}, content_inputs=[src])


def test_after_names_the_stages_a_stage_reads_and_rejects_unknown_ones(tmp_path):
    run = Run(tmp_path)
    run.stage("a", dict, settings={"x": 1})
    run.stage("b", dict, settings={})
    run.stage("c", dict, settings={}, after="a")  # does not read b
    again = Run(tmp_path)
    again.stage("a", dict, settings={"x": 1})
    again.stage("c", dict, settings={}, after="a")  # b skipped this time: c still reused
    assert again.reused == ["a", "c"]
    with pytest.raises(ValueError, match="names no earlier stage"):
        again.stage("d", dict, settings={}, after="zzz")


@dataclass
class _Section:
    data: str = ""
    on_change: str = "error"
    extra: dict = field(default_factory=dict)


def test_stage_config_copies_the_section_and_inherits_overwrite():
    from kale_ray.runtime.stages import inherit_on_change, stage_config

    assert inherit_on_change("overwrite", "error") == "overwrite" and inherit_on_change("error", "overwrite") == "overwrite"
    assert inherit_on_change("error", "error") == "error"
    own = _Section(extra={"a": 1})
    got = stage_config(own, "error", data="rows")
    assert got == _Section(data="rows", extra={"a": 1}) and got.extra is not own.extra  # a deep copy
    assert stage_config(own, "overwrite").on_change == "overwrite" and own.on_change == "error"
    assert stage_config(_Section(on_change="overwrite"), "error").on_change == "overwrite"


def test_a_training_stage_counts_max_steps_and_its_data_resolved(tmp_path, monkeypatch):
    """More steps are a change for a recipe's complete stage (it is not run again), and the preflight
    (config as typed: a relative data path) and the run (resolved) see the same trainer record."""
    from kale_ray.config import TrainConfig
    from kale_ray.train.trainer import stage_settings, training_stage

    (tmp_path / "rows").mkdir()
    (tmp_path / "rows" / "a.jsonl").write_text('{"prompt": "p", "completion": "c"}\n')
    monkeypatch.chdir(tmp_path)
    rel, abs_ = TrainConfig(data="rows", out_dir="o"), TrainConfig(data=str(tmp_path / "rows"), out_dir="o")
    assert training_stage(rel).hash == training_stage(abs_).hash
    assert stage_settings(TrainConfig(data="rows", max_steps=10)) != stage_settings(TrainConfig(data="rows", max_steps=20))
    assert training_stage(TrainConfig(data="rows", max_steps=10)).hash == training_stage(TrainConfig(data="rows", max_steps=20)).hash
