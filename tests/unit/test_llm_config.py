"""The vLLM processor config that reaches ray.data.llm: tp/pp, placement group, replicas.

Building ``vLLMEngineProcessorConfig`` (a pydantic model) needs no GPU and starts no Ray.
"""
import pytest

from kale_ray.config import ConfigError, GenerationConfig, SynthConfig, load_config
from kale_ray.runtime.llm import vllm_processor_config


def _cfg(**kw):
    return vllm_processor_config("/models/teacher", GenerationConfig(**kw), 1024)


def test_cpu_default():
    c = _cfg()
    assert "tensor_parallel_size" not in c.engine_kwargs
    assert "pipeline_parallel_size" not in c.engine_kwargs
    assert "distributed_executor_backend" not in c.engine_kwargs
    # ray's PlacementGroupConfig validator normalises the bundle {"CPU": 1} to {"CPU": 1.0, "GPU": 0.0}.
    (bundle,) = c.placement_group_config["bundles"]
    assert (bundle["CPU"], bundle.get("GPU", 0)) == (1, 0)
    assert c.concurrency == 1


def test_tp4_gpu():
    c = _cfg(num_gpus_per_replica=1, tensor_parallel_size=4)
    assert c.engine_kwargs["tensor_parallel_size"] == 4
    assert c.engine_kwargs["pipeline_parallel_size"] == 1
    assert "distributed_executor_backend" not in c.engine_kwargs
    assert c.placement_group_config["bundles"] == [{"GPU": 1, "CPU": 1}] * 4
    assert c.placement_group_config["strategy"] == "STRICT_PACK"


def test_tp2_pp2_gpu():
    c = _cfg(num_gpus_per_replica=1, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert c.engine_kwargs["tensor_parallel_size"] == 2
    assert c.engine_kwargs["pipeline_parallel_size"] == 2
    assert c.engine_kwargs["distributed_executor_backend"] == "ray"
    assert len(c.placement_group_config["bundles"]) == 4
    assert c.placement_group_config["strategy"] == "PACK"


def test_autoscaling():
    c = _cfg(num_gpus_per_replica=1, tensor_parallel_size=2, concurrency=1, max_concurrency=4)
    assert c.concurrency == (1, 4)
    assert len(c.placement_group_config["bundles"]) == 2
    assert _cfg(concurrency=1, max_concurrency=4).concurrency == (1, 4)


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_parallel_on_cpu_refused(key):
    with pytest.raises(ConfigError, match=f"generation.{key} > 1 needs GPUs"):
        _cfg(**{key: 2})


@pytest.mark.parametrize("override", [
    "generation.tensor_parallel_size=0", "generation.pipeline_parallel_size=0",
    "generation.concurrency=0", "generation.max_concurrency=-1", "generation.batch_size=0",
    "generation.max_tokens=0", "generation.gpu_memory_utilization=0", "generation.gpu_memory_utilization=1.5",
    "generation.temperature=-0.1", "generation.top_p=0", "generation.top_p=1.2",
])
def test_range_errors_name_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(SynthConfig, None, [override])


def test_valid_overrides_load():
    cfg = load_config(SynthConfig, None, ["generation.tensor_parallel_size=4", "generation.pipeline_parallel_size=2"])
    assert (cfg.generation.tensor_parallel_size, cfg.generation.pipeline_parallel_size) == (4, 2)
