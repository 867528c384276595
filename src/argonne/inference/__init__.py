"""Inference: the one engine behind `generate`, `chat`, `serve`, lm-eval and training samples.

- `sampling.py`   the request's settings (SamplingParams), the one batched sampler, Completion, NonFiniteLogits
- `text.py`       incremental detokenization with stop strings; prompts from a file
- `kv_cache.py`   the paged KV cache (blocks, block tables, the views the model writes and reads) and the prefix cache
- `runner.py`     the model prepared for inference; the prefill and decode forwards (a CUDA graph per batch bucket)
- `scheduler.py`  waiting, prefilling and running sequences; admission, chunked prefill, preemption
- `engine.py`     the engine: requests in, tokens and completions out, in the caller's thread or its own
- `decode_kernels.py`  Triton GEMV and decode-attention kernels for one-row decoding on GPUs (a runner option)
- `uncached.py`   the one uncached greedy loop, for models sharded in training
"""
