"""Pruning internals, one job per module (the `prune` stage in compress/stages/prune.py drives them).

- targets.py      which linear layers a pattern selects (lm_head, heads and embeddings skipped)
- masks.py        unstructured and N:M keep-masks from magnitude or Wanda scores
- importance.py   importance of heads, FFN channels and layers (weight norm, activation, Taylor),
                  measured on compress.calibration's batches
- structured.py   removal of heads / FFN channels / layers, rewriting the config to match
"""
