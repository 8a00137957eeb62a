"""Distillation parts: students (student.py), compatibility checks (compat.py), losses (losses.py),
the teacher's top-k cache (cache.py) and the training objective (objective.py)."""
