"""The pure core every method shares: no Ray, vLLM or DeepSpeed; tested in milliseconds.

* :mod:`kale_ray.core.kg`          KG loading (TSV/CSV/JSONL, compressed, builtin KGs) and the CSR index
* :mod:`kale_ray.core.kgstore`     the columnar KG built once, cached on disk, memory-mapped by every worker
* :mod:`kale_ray.core.search`      path search, one module per strategy (``core.paths`` re-exports it)
* :mod:`kale_ray.core.qa`          questions: generation (distractor policies, hop probes), linking, JSONL I/O
* :mod:`kale_ray.core.qa_formats`  users' QA dataset shapes mapped onto ours
* :mod:`kale_ray.core.prompts`     chat messages and rendering with a model's template
* :mod:`kale_ray.core.parse`       answers read back from generations (choice matching, normalised match)
* :mod:`kale_ray.core.losses`      tensor losses (KA, SFT, DPO, InfoNCE) with the global-count convention
* :mod:`kale_ray.core.rejects`     rejected rows with their reasons
* :mod:`kale_ray.core.io`          the atomic JSON / JSONL writers and the strict reader
* :mod:`kale_ray.core.hpo`         the embedded HPO ontology as a KG
"""
