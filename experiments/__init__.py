"""Studies that turn the paper's claims into tables (`python -m experiments.NAME`).

  main_table   held-out accuracy of PU-RLD and every baseline (experiments/main_table.py)
  ablation     ranking-vs-oracle agreement per scheme x K on one stored
               candidate pool, and the K x scheme x loss training grid
  rerank       re-score a run's stored pools with more schemes
  common       the cell runner every study uses (one subprocess per cell)

See experiments/README.md.
"""
