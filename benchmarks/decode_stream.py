"""How fast the decoding kernel streams weights from memory, against dense GEMVs, one token.

A decoding step on a CPU reads every weight once and is bound by memory, so what a kernel is
worth there is the rate it streams at. This times one pass over the 210 linear layers of a
SmolLM2-135M-shaped model (q, k, v, o, gate, up, down of 30 blocks: 160 MB of Monarch factors at
4 blocks, far more than any cache) through the path ``auto`` picks for one token (the native
kernel where it is built) and through ``F.linear`` on the dense weights of the same shapes,
interleaved, and prints each pass's median time, its GB/s and the ratio. Random weights: the
rate does not depend on the values.

    python benchmarks/decode_stream.py --threads 1
    python benchmarks/decode_stream.py --threads 2 --nblocks 4 --repeat 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from monarchify.monarch import MonarchLinear

SMOLLM2_BLOCK = [(576, 576), (576, 192), (576, 192), (576, 576), (576, 1536), (576, 1536), (1536, 576)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--blocks", type=int, default=30, help="transformer blocks (7 layers each)")
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = SMOLLM2_BLOCK * args.blocks
    with torch.no_grad():
        monarch = [MonarchLinear(i, o, nblocks=args.nblocks, bias=False).eval() for i, o in shapes]
        dense = [torch.randn(o, i) for i, o in shapes]
        inputs = {width: torch.randn(1, width) for width in {i for i, _ in shapes}}

        def monarch_pass() -> None:
            for layer, (i, _) in zip(monarch, shapes):
                layer(inputs[i])

        def dense_pass() -> None:
            for weight, (i, _) in zip(dense, shapes):
                F.linear(inputs[i], weight)

        times: dict[str, list[float]] = {"monarch": [], "dense": []}
        monarch_pass(), dense_pass()  # warm-up: the kernel is built and loaded here
        for _ in range(args.repeat):
            for name, run in (("monarch", monarch_pass), ("dense", dense_pass)):
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    sizes = {"monarch": sum(m.R.numel() + m.L.numel() for m in monarch) * 4, "dense": sum(w.numel() for w in dense) * 4}
    median = {name: statistics.median(t) for name, t in times.items()}
    for name in ("monarch", "dense"):
        print(f"{name:8s} {median[name] * 1e3:7.2f} ms  {sizes[name] / 1e6:6.0f} MB  {sizes[name] / median[name] / 1e9:5.1f} GB/s")
    print(f"threads {args.threads}, {len(shapes)} layers at {args.nblocks} blocks: Monarch {median['dense'] / median['monarch']:.2f}x dense "
          f"(medians of {args.repeat})")


if __name__ == "__main__":
    main()
