"""Fine-tuning on Ray Train + DeepSpeed ZeRO, shared by every method.

* :mod:`kale_ray.train.trainer`    the driver side: settings record, ``fit_resumable`` (the one Ray Train launch),
                                   history, summary, export
* :mod:`kale_ray.train.loop`       the worker loop: DeepSpeed engine, global-count normalisation, checkpoints, resume
* :mod:`kale_ray.train.registry`   losses by name (sft, kale built in; methods and plug-ins register theirs through
                                   the ``kale_ray.losses`` entry points)
* :mod:`kale_ray.train.collators`  ``RowCollator`` (the one base) and the prompt/completion collator
* :mod:`kale_ray.train.heads`      answer-position logits over a (PEFT) causal LM
* :mod:`kale_ray.train.export`     LoRA adapter and merged model
"""
