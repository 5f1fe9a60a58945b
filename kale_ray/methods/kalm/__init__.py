"""KaLM: knowledge-aligned language modelling (dual-view KG contrastive alignment + triple completion).

* :mod:`kale_ray.methods.kalm.data`     triples -> training rows (both views, inverse relations, LM prompt); pure
* :mod:`kale_ray.methods.kalm.losses`   the ``kalm`` loss and collator, registered with the trainer; torch only
* :mod:`kale_ray.methods.kalm.evaluate` KG completion (filtered ranking) and KGQA (vLLM) evaluation
* :mod:`kale_ray.methods.kalm.recipe`   ``run_kalm``: eval before -> train -> eval after -> report
* :mod:`kale_ray.methods.kalm.report`   report.md: before and after side by side
* :mod:`kale_ray.methods.kalm.config`   the job's typed config

Importing this package imports nothing heavy.
"""
