"""Pruning internals, one job per module (the `prune` stage in compress/stages/prune.py drives them).

- targets.py      which linear layers a pattern selects (lm_head, heads and embeddings skipped)
- calibration.py  calibration batches and forward hooks (input-channel norms, block influence)
- masks.py        unstructured and N:M keep-masks from magnitude or Wanda scores
- importance.py   importance of heads, FFN channels and layers (weight norm, activation, Taylor)
- structured.py   removal of heads / FFN channels / layers, rewriting the config to match
"""
