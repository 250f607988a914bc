"""Studies that turn the paper's claims into tables (`python -m experiments.NAME`).

  ladder       the learning ladder: untrained -> SFT -> oracle GRPO -> the
               methods; its cells are every study's cells
  main_table   every method and baseline side by side, from the ladder's cells
  ablation     group size K x ranking scheme: one pool re-ranked, and trained
  writing      open-ended prompts, judged by pairwise win rate
  compare      B minus A on the same prompts (cells, seeds or studies)
  rerank       re-score a run's stored pools; calibrate pu.delta
  claims       the ranking's order consistency and concentration, measured
  pool         the ablation's stored candidate pool, re-ranked per K
  analysis     answers.json and the tables and plots built from it
  common       the cell runner every study uses (one subprocess per cell)

See experiments/README.md.
"""
