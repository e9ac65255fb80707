"""Step time of the models ``monarchify train`` builds, dense against Monarch, in one process.

    OMP_NUM_THREADS=1 python benchmarks/train_step_time.py --layers 4 --width 384 --heads 6 --vocab-size 4096

The training runs of docs/training.md run side by side on a shared machine whose load moves;
this times one training step (forward, backward, AdamW) of each model on the same random batch,
alternating dense and Monarch (:func:`monarchify.hf.model_bench.models_benchmark`), so both see the same
conditions. The Monarch-then-dense run is a Monarch run and then a dense one: its step times are
these two.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gpt2")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--nblocks", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()

    from monarchify import MonarchConfig
    from monarchify.hf import model_bench as bench
    from monarchify.lm.build import init_model

    sizes = dict(layers=args.layers, width=args.width, heads=args.heads, vocab_size=args.vocab_size, positions=args.seq_len)
    dense, _ = init_model(args.arch, None, seed=0, **sizes)
    monarch, _ = init_model(args.arch, MonarchConfig(nblocks=args.nblocks), seed=0, **sizes)
    load = list(os.getloadavg())
    result = bench.models_benchmark(dense, monarch, batch=args.batch, seq_len=args.seq_len, device="cpu",
                                    warmup=args.warmup, repeat=args.repeat, generation=None)
    result["load_average_at_start"], result["load_average_at_end"] = load, list(os.getloadavg())
    result["threads"] = torch.get_num_threads()
    for kind in ("inference", "train_step"):
        r = result[kind]
        print(f"{kind:<11} dense {r['dense_ms']:8.0f} ms  Monarch {r['monarch_ms']:8.0f} ms  dense/Monarch {r['ratio']:.2f}×")
    print(f"params: {result['params']}; load {load} -> {result['load_average_at_end']}; {result['threads']} thread(s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
