"""KALE: knowledge-augmented LM fine-tuning with a KL term pulling the no-rationale prediction toward
the with-rationale one.

* :mod:`kale_ray.methods.kale.recipe`    the whole job as ``Run.stage`` calls: synthesis (kale_ray.synth)
                                         -> training rows -> SFT and KALE (kale_ray.train, loss ``kale``)
                                         -> evaluation -> metrics.json, report.md, plot.png
* :mod:`kale_ray.methods.kale.evaluate`  multiple-choice evaluation through kale_ray.runtime.generate, with
                                         hop-fact probes (known & incorrect)
* :mod:`kale_ray.methods.kale.metrics`   accuracy with intervals, known-and-incorrect rate; pure
* :mod:`kale_ray.methods.kale.report`    report.md and plot.png of a run

The KALE pieces that every method can use stay in kale_ray.core: path search (``core.search``, one module per strategy), QA
and linking (``core.qa``), prompts, parsing and the KA loss (``core.losses``).
"""
