"""One package per method; each recipe is a list of ``Run.stage`` calls (kale_ray.runtime.stages)
over the shared core (kale_ray.core), runtime (kale_ray.runtime: storage, stages, generate, report,
tracking) and trainer (kale_ray.train, where each method registers its loss):

* :mod:`kale_ray.methods.kale`        KALE: KG paths -> teacher rationales -> SFT vs KA training -> evaluation
                                      with the known-and-incorrect diagnostic (``kale-ray kale`` / ``demo``);
                                      its synthesis engine is :mod:`kale_ray.synth` (Ray Data, streaming)
* :mod:`kale_ray.methods.kard`        KARD: retrieval-augmented rationale distillation with a reranker
* :mod:`kale_ray.methods.knowtuning`  KnowTuning: atomic facts, difficult-knowledge filter, rewrites, DPO
* :mod:`kale_ray.methods.kalm`        KaLM: dual-view contrastive alignment + triple completion
"""
