"""KnowTuning: knowledge-aware fine-tuning for completeness, factuality and logicality (Lyu et al. 2024).

* :mod:`kale_ray.methods.knowtuning.corrupt`  atomic facts -> worse answers (delete / revise with the KG / shuffle)
  and the (better, worse) comparison pairs; pure (numpy + the KG core)
* :mod:`kale_ray.methods.knowtuning.data`     KG-neighbourhood long-form answers, users' fact files, rendered rows
* :mod:`kale_ray.methods.knowtuning.dpo`      the ``dpo`` loss and pair collator on the trainer's registry, and the
  reference log-prob pass run once before training
* :mod:`kale_ray.methods.knowtuning.stage2`   Stage II end to end: pairs -> reference pass -> Ray Train DPO
* :mod:`kale_ray.methods.knowtuning.config`   the jobs' typed configs (Stage II alone; the whole recipe)
* :mod:`kale_ray.methods.knowtuning.longform` long-form QA from a KG (HPO: "Describe the clinical features of
  <disease>") or users' files, every answer with the facts it was built from; pure
* :mod:`kale_ray.methods.knowtuning.atomic`   Stage I's teacher prompts, JSON parsers, perplexity and the
  difficult-fact selection; pure
* :mod:`kale_ray.methods.knowtuning.factcheck` fact-level evaluation: link a fact's entities, check the triple
  in the KG (correct / incorrect / unverifiable), completeness; pure
* :mod:`kale_ray.methods.knowtuning.teacher`  teacher / student generation on Ray Data (vLLM guided JSON or HTTP)
  with seeded retries and rejects
* :mod:`kale_ray.methods.knowtuning.stage1`   Stage I rows: atomic facts -> perplexity (Ray Data actor) ->
  difficult facts -> rewrites
* :mod:`kale_ray.methods.knowtuning.evaluate` answers to held-out questions, facts, KG checks per model
* :mod:`kale_ray.methods.knowtuning.recipe`   the whole recipe (``kale-ray knowtuning``) as ``Run.stage`` calls
* :mod:`kale_ray.methods.knowtuning.report`   report.md: the fact-level metrics side by side

Importing this package imports nothing heavy.
"""
