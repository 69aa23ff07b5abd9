"""Training engine: loss, optimisation, EMA, checkpoints, DDP, the loop (`hermes train`), MedContext."""
