"""KnowTuning: knowledge-aware fine-tuning for completeness, factuality and logicality (Lyu et al. 2024).

* :mod:`kale_ray.knowtuning.corrupt`  atomic facts -> worse answers (delete / revise with the KG / shuffle)
  and the (better, worse) comparison pairs; pure (numpy + the KG core)
* :mod:`kale_ray.knowtuning.data`     KG-neighbourhood long-form answers, users' fact files, rendered rows
* :mod:`kale_ray.knowtuning.dpo`      the ``dpo`` loss and pair collator on the trainer's registry, and the
  reference log-prob pass run once before training
* :mod:`kale_ray.knowtuning.recipe`   Stage II end to end: pairs -> reference pass -> Ray Train DPO
* :mod:`kale_ray.knowtuning.config`   the job's typed config

Importing this package imports nothing heavy.
"""
