"""Training: `argonne train`, `argonne sft` and `argonne distill` share one loop (loop.py) and differ in their
`TrainSpec` (build.py; distill.py for distillation). One module per concern: build (tokenizer, model, data,
objective), loop (the run, the step, the loop, the export), hooks (the loop's periodic actions), metrics (the log,
the console, MFU), recovery (non-finite steps, loss spikes, rollbacks, preemption), resume (the run folder and the
checkpoint a run starts from)."""
