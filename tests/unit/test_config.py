"""Typed configs (kale_ray.config): defaults, YAML + overrides, errors that name the key."""
from __future__ import annotations

import dataclasses

import pytest

from kale_ray.config import (
    ConfigError,
    KALEJobConfig,
    EvalConfig,
    SynthConfig,
    TrainConfig,
    dump_config,
    load_config,
)

ALL = [SynthConfig, TrainConfig, EvalConfig, KALEJobConfig]


@pytest.mark.parametrize("cls", ALL)
def test_defaults_load_equal_dataclass_defaults(cls):
    assert load_config(cls) == cls()
    assert load_config(cls, None, []) == cls()


def test_train_defaults_values():
    from kale_ray.config import KALETrainConfig

    cfg = load_config(KALETrainConfig)  # the train job's class
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)
    assert cfg.lora.r == 16 and cfg.lora.enabled is True
    assert cfg.ka.direction == "forward"
    assert cfg.zero_stage == 2


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "train.yaml"
    p.write_text("lr: 0.001\nepochs: 3\nlora:\n  r: 4\n  alpha: 8\nka:\n  lam: 0.5\n")
    cfg = load_config(TrainConfig, p, ["loss=kale", "epochs=5", "lora.r=8", "ka.direction=reverse"])
    assert cfg.lr == pytest.approx(1e-3)
    assert cfg.epochs == 5  # override beats YAML
    assert cfg.lora.r == 8  # nested override beats YAML
    assert cfg.lora.alpha == 8  # YAML sibling of an overridden key survives
    assert cfg.lora.dropout == 0.0  # untouched field keeps its default
    assert cfg.ka.lam == 0.5 and cfg.ka.direction == "reverse"
    assert cfg.model.name == TrainConfig().model.name


def test_nested_override_without_yaml():
    cfg = load_config(TrainConfig, None, ["lora.r=8", "lr=1e-3", "use_gpu=true", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.lora.r == 8 and isinstance(cfg.lora.r, int)
    assert cfg.lr == pytest.approx(1e-3) and isinstance(cfg.lr, float)
    assert cfg.use_gpu is True
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 32


def test_int_given_to_float_field_becomes_float():
    cfg = load_config(TrainConfig, None, ["lr=1"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_deeply_nested_override():
    cfg = load_config(KALEJobConfig, None, ["train.lora.r=2", "synth.paths.k=5", "synth.kg.on_error=skip"])
    assert cfg.train.lora.r == 2
    assert cfg.synth.paths.k == 5
    assert cfg.synth.kg.on_error == "skip"
    assert cfg.train.lora.alpha == 32


def test_partial_override_keeps_non_class_default_of_section():
    """EvalConfig.generation defaults to max_tokens=16 (not GenerationConfig's 96): overriding
    one generation key must not reset the others to the class defaults."""
    base = EvalConfig()
    assert base.generation.max_tokens == 16
    cfg = load_config(EvalConfig, None, ["generation.backend=template"])
    assert cfg.generation.backend == "template"
    assert cfg.generation.max_tokens == 16
    demo = load_config(KALEJobConfig, None, ["eval.generation.backend=template"])
    assert demo.eval.generation.max_tokens == 16


def test_partial_yaml_section_keeps_non_class_default(tmp_path):
    p = tmp_path / "eval.yaml"
    p.write_text("generation:\n  backend: http\n")
    cfg = load_config(EvalConfig, p)
    assert cfg.generation.backend == "http"
    assert cfg.generation.max_tokens == 16


def test_type_error_names_key():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["lr=fast"])
    msg = str(ei.value)
    assert "lr" in msg and "fast" in msg


def test_type_error_names_nested_key():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["lora.r=big"])
    assert "lora.r" in str(ei.value)


def test_type_error_in_yaml_names_key(tmp_path):
    p = tmp_path / "t.yaml"
    p.write_text("lora:\n  enabled: maybe\n")
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, p)
    assert "lora.enabled" in str(ei.value)


def test_bool_is_not_an_int():
    with pytest.raises(ConfigError, match="epochs"):
        load_config(TrainConfig, None, ["epochs=true"])


def test_list_item_error_names_index():
    with pytest.raises(ConfigError) as ei:
        load_config(SynthConfig, None, ["qa.hops=[1, two]"])
    assert "qa.hops[1]" in str(ei.value)


def test_unknown_key_did_you_mean():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["lrr=0.1"])
    msg = str(ei.value)
    assert "unknown key 'lrr'" in msg
    assert "did you mean" in msg and "'lr'" in msg


def test_unknown_nested_key_did_you_mean():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["lora.rr=8"])
    msg = str(ei.value)
    assert "lora.rr" in msg and "did you mean 'lora.r'" in msg


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "s.yaml"
    p.write_text("paths:\n  max_hop: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(SynthConfig, p)
    assert "paths.max_hop" in str(ei.value) and "paths.max_hops" in str(ei.value)


def test_unknown_key_far_from_anything_has_no_suggestion():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["zzzzzzzz=1"])
    assert "zzzzzzzz" in str(ei.value) and "did you mean" not in str(ei.value)


def test_literal_violation_lists_allowed_values():
    with pytest.raises(ConfigError) as ei:
        load_config(SynthConfig, None, ["generation.backend=openai"])
    msg = str(ei.value)
    assert "generation.backend" in msg and "openai" in msg
    for allowed in ("vllm", "http", "template"):
        assert allowed in msg


def test_literal_int_violation():
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, None, ["zero_stage=4"])
    msg = str(ei.value)
    assert "zero_stage" in msg
    for allowed in ("0", "1", "2", "3"):
        assert allowed in msg
    assert load_config(TrainConfig, None, ["zero_stage=3"]).zero_stage == 3


def test_string_field_keeps_override_text():
    # YAML would read these as numbers (0123 even as octal 83); a str field keeps what was typed.
    cfg = load_config(TrainConfig, None, ["model.name=0123", "data=1e5", "loss=7"])
    assert cfg.model.name == "0123"
    assert cfg.data == "1e5"
    assert cfg.loss == "7"
    # optional string field too
    s = load_config(SynthConfig, None, ["kg.names=2024", "generation.http_model=1.5"])
    assert s.kg.names == "2024" and s.generation.http_model == "1.5"


def test_optional_field_accepts_null():
    cfg = load_config(KALEJobConfig, None, ["ray_address=null"])
    assert cfg.ray_address is None
    cfg = load_config(KALEJobConfig, None, ["ray_address=auto"])
    assert cfg.ray_address == "auto"


def test_yaml_top_level_list_rejected_with_file_name(tmp_path):
    p = tmp_path / "listy_config.yaml"
    p.write_text("- lr: 0.1\n- epochs: 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(TrainConfig, p)
    assert "listy_config.yaml" in str(ei.value)


def test_invalid_yaml_names_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(TrainConfig, p)


def test_missing_file_and_bad_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(TrainConfig, None, ["lr"])


def test_empty_yaml_is_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("# nothing here\n")
    assert load_config(SynthConfig, p) == SynthConfig()


@pytest.mark.parametrize("cls", ALL)
def test_dump_then_load_roundtrip(cls, tmp_path):
    cfg = load_config(cls, None, [])
    p = tmp_path / "dump.yaml"
    dump_config(cfg, p)
    again = load_config(cls, p)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_train_and_eval_defaults_point_at_what_prepare_and_synthesis_write():
    """One name for the prepared-rows folder: prepare's default out, train's default data, the configs, README."""
    from pathlib import Path

    import yaml

    from kale_ray.cli import PrepareConfig
    from kale_ray.config import EvalConfig, SynthConfig, TrainConfig

    repo = Path(__file__).resolve().parents[2]
    rows = PrepareConfig().out
    assert TrainConfig().data == rows == "runs/rows"
    for name in ("train_kale.yaml", "train_sft.yaml"):
        assert yaml.safe_load((repo / "configs" / name).read_text())["data"] == rows, name
    readme = (repo / "README.md").read_text()
    assert f"--out {rows}" in readme and f"data={rows}" in readme
    # synthesis writes out_dir/qa/{train,test}.jsonl
    assert EvalConfig().data == f"{SynthConfig().out_dir}/qa/test.jsonl"


def test_a_loss_section_for_a_loss_the_job_does_not_train_is_refused_on_load():
    from kale_ray.config import ConfigError, TrainConfig, load_config
    from kale_ray.methods.kard.config import KARDJobConfig
    from kale_ray.methods.kalm.config import KaLMJobConfig

    with pytest.raises(ConfigError, match=r"^train\.kalm: settings of loss 'kalm', but train\.loss is 'sft'"):
        load_config(KARDJobConfig, None, ["train.kalm.tau=0.1"])
    with pytest.raises(ConfigError, match=r"^ka: settings of loss 'kale', but loss is 'sft'"):
        load_config(TrainConfig, None, ["loss=sft", "ka.lam=2"])
    assert load_config(TrainConfig, None, ["loss=kale", "ka.lam=2"]).ka.lam == 2
    assert load_config(KaLMJobConfig, None, ["train.kalm.tau=0.1"]).train.kalm.tau == 0.1


def test_loss_settings_live_in_their_losses_train_configs_not_in_train_config():
    """TrainConfig holds what every loss shares; kale / kalm / dpo each have their own subclass."""
    import dataclasses

    from kale_ray.config import KALETrainConfig, TrainConfig, load_config, train_config_class, with_loss
    from kale_ray.methods.kalm.config import KaLMTrainConfig
    from kale_ray.methods.knowtuning.config import DPOTrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not shared & {"ka", "kalm", "dpo"}
    assert [train_config_class(x) for x in ("sft", "kale", "kalm", "dpo")] == [
        TrainConfig, KALETrainConfig, KaLMTrainConfig, DPOTrainConfig]
    # the train job: the loss picks the class, its own section then loads
    cfg = load_config(KALETrainConfig, None, ["loss=dpo", "dpo.beta=0.3", "lr=1e-3"])
    assert type(cfg) is DPOTrainConfig and cfg.dpo.beta == 0.3 and cfg.lr == 1e-3
    # a run derived for another loss keeps the shared settings and loads back as the same class
    sft = with_loss(KALETrainConfig(lr=5e-4), "sft", out_dir="x")
    assert type(sft) is TrainConfig and sft.lr == 5e-4 and sft.out_dir == "x"
    assert load_config(TrainConfig, None, [f"{k}={v}" for k, v in (("loss", "sft"), ("lr", 5e-4))]) == \
        dataclasses.replace(sft, out_dir=TrainConfig().out_dir)


def test_a_dumped_training_config_loads_back_as_it_ran(tmp_path):
    """The demo derives its SFT run from a KALE section: that run's config.yaml reloads (no ka section)."""
    from kale_ray.config import KALEJobConfig, TrainConfig, dump_config, load_config
    from kale_ray.runtime.stages import stage_config

    demo = KALEJobConfig()
    for loss in ("sft", "kale"):
        run = stage_config(demo.train, "error", loss=loss, out_dir=str(tmp_path / loss))
        dump_config(run, tmp_path / f"{loss}.yaml")
        assert load_config(TrainConfig, tmp_path / f"{loss}.yaml") == run


SHIPPED = {"configs/demo.yaml": "demo", "configs/eval.yaml": "evaluate", "configs/kalm_umls.yaml": "kalm",
           "configs/kard_umls.yaml": "kard", "configs/knowtuning_dpo.yaml": "knowtuning-dpo",
           "configs/knowtuning_hpo.yaml": "knowtuning", "configs/synth_umls.yaml": "synthesize",
           "configs/train_kale.yaml": "train", "configs/train_sft.yaml": "train",
           "docs/kalm_run/config.yaml": "kalm", "docs/knowtuning_run/config.yaml": "knowtuning"}


@pytest.mark.parametrize("path", sorted(SHIPPED))
def test_every_shipped_config_loads_with_its_jobs_class(path):
    from pathlib import Path

    from kale_ray import cli

    root = Path(__file__).resolve().parents[2]
    assert {str(p.relative_to(root)) for p in (root / "configs").glob("*.yaml")} <= set(SHIPPED)
    load_config(cli.JOBS[SHIPPED[path]][0], root / path)
