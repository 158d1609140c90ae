"""Measurement code shared by the benchmark suite and the tools: FLOPs and timing, workloads,
baselines (stock fair-esm, Hugging Face transformers), accuracy against an fp32 reference."""
