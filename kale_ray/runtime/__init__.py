"""The only Ray / vLLM / storage code the methods touch.

* :mod:`kale_ray.runtime.ray`        ``init_ray`` / ``init_ray_for(job_config)``: the one Ray start (cluster or local)
* :mod:`kale_ray.runtime.stages`     ``Run.stage``: settings-hashed stage records (reuse, resume, refuse, overwrite)
* :mod:`kale_ray.runtime.generate`   the one generation path (prompt budget, blocks, vLLM | HTTP, error columns)
* :mod:`kale_ray.runtime.llm`        the generation backends (``ray.data.llm`` vLLM processor, OpenAI-compatible HTTP)
* :mod:`kale_ray.runtime.storage`    local folders and pyarrow filesystem URIs, atomic writes, completion markers
* :mod:`kale_ray.runtime.preflight`  inputs, out_dir and stale outputs checked before Ray starts
* :mod:`kale_ray.runtime.tracking`   TensorBoard / MLflow / W&B
* :mod:`kale_ray.runtime.report`     machine info and intervals for the methods' reports
"""
