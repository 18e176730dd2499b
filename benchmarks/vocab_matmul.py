"""How much an odd vocabulary size costs the (B*S, V) x (V, D) products of an EBT step on a GPU.

The EBT's candidate is a row of V logits; every unroll step multiplies (N, V) tensors by the (D, V)
candidate map in three shapes (forward, the gradient to the candidate, the weight gradient). With V =
50277 (GPT-NeoX) the rows are not 16-byte aligned in bf16 and cuBLAS cannot use its fastest kernels.
This times each shape at V and at V rounded up to a multiple of 64, plus a row softmax, in one run.

    python benchmarks/vocab_matmul.py --device cuda
"""

import argparse
import sys
import time

import torch


def bench(fn, reps=20):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=8192, help="positions per batch (B x S)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--vocab", type=int, default=50277)
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    dev, bf = torch.device(a.device), torch.bfloat16
    print(f"# {torch.cuda.get_device_name(dev)} | torch {torch.__version__} | N {a.n} D {a.d}")
    print("| V | y = p W^T (ms) | g = u W (ms) | dW = u^T v (ms) | TFLOP/s (mean) | softmax fp32 (ms) |\n|---|---|---|---|---|---|")
    for V in (a.vocab, (a.vocab + 63) // 64 * 64):
        torch.manual_seed(0)
        p_ = torch.randn(a.n, V, device=dev, dtype=bf)
        W = torch.randn(a.d, V, device=dev, dtype=bf)
        u = torch.randn(a.n, a.d, device=dev, dtype=bf)
        z = torch.randn(a.n, V, device=dev)
        t = [bench(lambda: p_ @ W.t()), bench(lambda: u @ W), bench(lambda: u.t() @ p_)]
        flops = 2 * a.n * V * a.d
        sm = bench(lambda: torch.softmax(z, -1))
        print(f"| {V} | {t[0]:.2f} | {t[1]:.2f} | {t[2]:.2f} | {sum(flops / (x * 1e-3) for x in t) / 3 / 1e12:.0f} | {sm:.2f} |")


if __name__ == "__main__":
    main()
