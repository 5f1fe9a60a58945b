"""KARD: knowledge-augmented reasoning distillation into a small LM, with a neural reranker.

Pure core (no Ray/vLLM/DeepSpeed): ``kb`` (passages), ``retrieval`` (BM25 via bm25s), ``prompts``,
``verify``, ``data``, ``losses`` (max-sim, reranker KL/CE). Torch models: ``reranker``, ``scoring``.
Ray: ``rerank_train`` (Ray Train), ``stages`` (each stage of the job), ``recipe`` (the job: the list of
its stages). ``report`` writes report.md.
"""
