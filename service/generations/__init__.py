"""Generations: intake, the line, submit, callback and poll, storing results, batches, triggers."""
