"""Trainers: stage 1 (sft.py) and stage 2 (pu_rl.py with dpo/grpo/ldl steps).

Shared pieces: state.py (TrainState, optimizer, NaN policy), loop.py (the
host side of a loop: progress, metrics one step late, checkpoint cadence),
student.py (model and tokenizer from the `model` config block).
"""
