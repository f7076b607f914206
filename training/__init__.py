"""Training and evaluating PrAd adapters: task data and templates, length-bucketed batches, the masked
training objective, the training loop, greedy decoding through the serving runners, and task metrics.

The objective is the paper's: one forward over `prompt + target` with a per-token mask (1 on prompt
tokens for PrAd variants) multiplying every adapter output, loss on target tokens only. Entry points:
`training.run.run_training` (`prad train`) and `training.evaluate.evaluate` (`prad eval`).
"""
