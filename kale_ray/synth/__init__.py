"""KALE's knowledge synthesis: questions -> linked entities -> KG paths -> teacher rationales -> kept rows.

* :mod:`kale_ray.synth.pipeline`   the streaming Ray Data job (``kale-ray synthesize``): shards planned by byte
                                   range, the KG shared by its cache folder, per-shard outputs with markers, resume
* :mod:`kale_ray.synth.steps`      pure row functions the shard tasks run (link, search, verify, parse)
* :mod:`kale_ray.synth.format`     rendering kept rows into a student's training rows (``kale-ray prepare``)
* :mod:`kale_ray.synth.qa_source`  users' QA datasets (Parquet, CSV, ``datasets``, other JSONL shapes) converted once
* :mod:`kale_ray.synth.ids`        duplicate question ids found in one bounded scan before the shards run
"""
