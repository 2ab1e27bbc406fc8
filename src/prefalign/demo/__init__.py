"""The bundled demo: a task with a deterministic judge, and the base vs DPO vs ORPO run."""
