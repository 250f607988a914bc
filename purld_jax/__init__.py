"""purld_jax: PU-RLD (positive-unlabeled RL distillation) in JAX / Flax NNX.

The data path, one module per stage (see README.md):
  data -> anchors (teacher, once per prompt) -> sampling -> scoring -> ranking
  -> preferences -> losses -> train/*
"""
