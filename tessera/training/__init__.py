"""Training the Llama generator, split by job as torchtitan does.

- `step`: the loss, one optimizer step over micro-batches, the optimizer and its schedule, seeds.
- `parallel`: the worker's place in the job; activation checkpointing, compile, DDP or FSDP2,
  applied to a model built for one device.
- `checkpoint`: sharded torch.distributed.checkpoint folders, resumable on any number of
  workers; export to one LlamaGen-format file.
- `metrics`: metrics.jsonl and TensorBoard events on any fsspec path.
- `loop`: the worker loop that Ray Train (or torchrun, or one process) runs.
- `plan`: per-GPU memory and tokens per step of a stage, before anything runs.
"""
