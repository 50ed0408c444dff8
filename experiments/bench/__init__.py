"""Benchmarks that print ratios against the competitors measured in the same run: quantize.py (block-wise
quantization vs bitsandbytes and a memory copy), optim.py (an optimizer step vs torch's fused Adam,
bitsandbytes and torchao), distributed.py (DDP and ZeRO overhead). They import quantlab only, never the
rest of experiments. gpu_check.sh runs the CUDA tests and the GPU benchmarks on a machine with a GPU."""
