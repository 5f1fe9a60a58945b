"""The only Ray / vLLM / storage code methods touch: ray start-up, generation, stages, storage."""
