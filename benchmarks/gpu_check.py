"""Everything the GPU path promises, checked and timed in a few minutes on one CUDA GPU.

    python benchmarks/gpu_check.py                 # prints the tables, writes gpu_check.json
    python benchmarks/gpu_check.py --quick         # fewer repeats, for a first look

1. Correctness: the fused Triton kernel against float64 (forward, dx, dR, dL, dbias) on
   fresh random inputs with every kernel buffer poisoned (NaN) beforehand, in float32,
   float16 and bfloat16, at BERT-base and LLM shapes; then a whole converted BERT-base run
   through the kernel against the same model through the strided path. Each case launches one
   of the autotuner's candidate tile configs (the first and the last by turns), not the
   autotuned one: compiling every candidate of every variant would take minutes.
2. Layers, bf16, nblocks 4: dense vs Monarch (the automatic choice: the strided path), with
   the fused kernel, the strided and the plain two-bmm paths forced alongside; forward and
   forward+backward; 16,384 tokens (the issue's targets) and 256 tokens (launch-bound).
   Decoding: the same without autograd at 1, 8 and 64 tokens, LLM shapes, then a causal LM
   (``--decode-model``; absent, a random model of SmolLM2-135M's shape) at nblocks 4: prefill
   and greedy decoding tokens per second at batch 1 and 8, through each path.
3. BERT-base classifier (random weights, batch 32×128, bf16): inference and a training
   step (forward, backward, AdamW), dense vs converted at nblocks 4, through each path.
4. Training from scratch (``monarchify train``'s code path), GPT-2 small (12 layers, 768
   wide), bf16, on the SST-2 and MRPC sentences: dense vs Monarch nblocks 4 vs Monarch then
   dense at 80 % of the steps, same data and steps; step-time ratio, held-out perplexity at
   equal steps and at equal training time (``--train-steps 0`` skips it).
5. Streaming conversion of a Llama-2-7B-shaped random bf16 checkpoint (13.5 GB, written by
   ``synthetic_llama7b.py``) at nblocks 4, projecting on the GPU: wall time, peak resident
   memory, output size, reload-and-run; within ``--llama7b-budget-s`` (``--llama7b-layers 0``
   skips it; the scratch folder is deleted after).

``--sections`` runs a subset, in the order given; a section that fails is reported and
the rest still run; the JSON is rewritten after every section (a run stopped at a time limit
keeps what it measured). Exit status 1 if a correctness check or a section fails. Ratios are dense time / Monarch time measured
in the same run (medians of interleaved runs, device synchronised around each call).
The first call of each shape autotunes the kernel; warm-up absorbs it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from monarchify import bench
from monarchify.hf import model_bench
from monarchify.monarch import kernels
from monarchify.monarch.kernels import check

LAYER_SHAPES = [(768, 3072), (3072, 768), (768, 768), (4096, 14336)]
TOKENS = [16384, 256]
DECODE_SHAPES = [(576, 1536), (4096, 11008), (4096, 4096), (4096, 1024)]  # SmolLM2's MLP, Llama-7B's MLP and attention (GQA k/v)
DECODE_TOKENS = [1, 8, 64]
DECODE_PATHS = ("strided", "small")  # timed beside the automatic choice
SECTIONS = ("correctness", "decode", "layers", "bert_base", "training", "llama7b")
TARGETS = {  # from the issue: (forward, forward+backward) at 16,384 tokens, bf16, nblocks 4
    (768, 3072): (2.0, 1.5),
    (3072, 768): (2.0, 1.5),
}


def correctness(device: str) -> tuple[bool, list[dict]]:
    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    results = check.run(check.GPU_CASES, dtypes, device) + check.run(check.GPU_DECODE_CASES, dtypes, device, inference=True)
    rows = [r.to_dict() for r in results]
    print("\n== correctness: fused kernel vs float64 (relative Frobenius error; outputs poisoned) ==")
    for r in results:
        errs = " ".join(f"{k}={v:.1e}" for k, v in r.errors.items())
        print(f"  {'ok  ' if r.ok else 'FAIL'} {r.dtype:<9} {r.shape:<32} {errs}  (tol {r.tolerance:.0e})")
    return all(r.ok for r in results), rows


def model_agreement(dense: torch.nn.Module, monarch: torch.nn.Module, device: torch.device) -> dict:
    """The converted BERT through the kernel vs through the strided path, same weights."""
    monarch = monarch.to(device=device, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 30000, (4, 128), device=device)
    with torch.no_grad():
        fused = monarch(input_ids=ids).logits.float()
        with kernels.use("strided"):
            plain = monarch(input_ids=ids).logits.float()
    rel = float((fused - plain).norm() / plain.norm())
    print(f"\n== converted BERT-base, fused kernel vs strided path (bf16 logits): relative difference {rel:.2e} ==")
    return {"rel_diff": rel, "ok": rel < 5e-2}


def layers(device: torch.device, warmup: int, repeat: int) -> list[dict]:
    rows = []
    paths = ("triton", "strided", "reference")
    print("\n== layers, bfloat16, nblocks 4 (ratio = dense / Monarch; >1: Monarch faster) ==")
    head = " ".join(f"{p:>9}" for p in paths)
    print(f"  {'shape':<12} {'tokens':>6} | forward: {'dense ms':>9} {'auto':>6} {head} | forward+backward: {'dense ms':>9} "
          f"{'auto':>6} {head} | target")
    for d_in, d_out in LAYER_SHAPES:
        for tokens in TOKENS:
            r = bench.layer_benchmark(d_in, d_out, 4, tokens, dtype=torch.bfloat16, device=device,
                                      implementations=paths, warmup=warmup, repeat=repeat)
            f, fb = r["forward"], r["forward_backward"]
            target = TARGETS.get((d_in, d_out)) if tokens == 16384 else None
            met = "" if target is None else ("met" if f["ratio"] >= target[0] and fb["ratio"] >= target[1] else "MISSED")
            cells = [f"{row['dense_ms']:9.3f} {row['ratio']:5.2f}× " + " ".join(f"{row['ratio_' + p]:8.2f}×" for p in paths)
                     for row in (f, fb)]
            print(f"  {d_in}→{d_out:<7} {tokens:>6} | forward: {cells[0]} | forward+backward: {cells[1]} | "
                  f"{'' if target is None else f'≥{target[0]}× / ≥{target[1]}× {met}'}", flush=True)
            r["target"] = None if target is None else {"forward": target[0], "forward_backward": target[1], "met": met == "met"}
            rows.append(r)
    return rows


def decode(device: torch.device, warmup: int, repeat: int, model_folder: Path | None,
           generation: model_bench.Generation = model_bench.Generation(prompt_tokens=128, new_tokens=48, batches=(1, 8)),
           paths: tuple[str, ...] = DECODE_PATHS) -> dict:
    """Decoding: single layers at a few tokens (inference, the launch-bound case), then a causal
    LM's prefill and greedy decoding against its dense twin, bf16; the automatic choice and each
    of ``paths`` forced, so the table says which path the automatic choice should be."""
    rows = []
    print("\n== decoding: layers at LLM shapes, bfloat16, nblocks 4, forward without autograd (dense / Monarch) ==")
    print(f"  {'shape':<12} {'tokens':>6} | {'dense ms':>9} {'auto ms':>9} {'auto':>6} " + " ".join(f"{p:>9}" for p in paths))
    for d_in, d_out in DECODE_SHAPES:
        for tokens in DECODE_TOKENS:
            r = bench.layer_benchmark(d_in, d_out, 4, tokens, dtype=torch.bfloat16, device=device, backward=False,
                                      implementations=paths, warmup=warmup, repeat=repeat)
            f = r["forward"]
            print(f"  {d_in}→{d_out:<7} {tokens:>6} | {f['dense_ms']:9.4f} {f['monarch_ms']:9.4f} {f['ratio']:5.2f}× "
                  + " ".join(f"{f['ratio_' + p]:8.2f}×" for p in paths), flush=True)
            rows.append(r)
    result: dict = {"layers": rows, "models": {}}
    if model_folder is not None and model_folder.is_dir():
        from monarchify.hf.loading import load_model

        name, source = model_folder.name, load_model(model_folder)
    else:
        # Speed does not depend on the weights: a GPU machine without the real checkpoint
        # times a random model of exactly its shape.
        print(f"  (no causal LM at {model_folder}: a random model of SmolLM2-135M's shape instead)")
        name, source = "SmolLM2-135M-shaped (random weights)", smollm2_shaped()
    dense, monarch = model_bench.model_pair(source, nblocks=4)
    timing = dict(batch=1, seq_len=generation.prompt_tokens, dtype=torch.bfloat16, device=device, train=False,
                  generation=generation, warmup=max(2, warmup // 3), repeat=max(5, repeat // 5))
    for path in ("auto", *paths):
        with kernels.use(path):
            model = model_bench.models_benchmark(dense, monarch, **timing)
        model["model"], model["path"] = name, path
        print(f"== {name} at nblocks 4, bfloat16, Monarch layers through {path}: tokens per second ==")
        for stage in ("prefill", "decode"):
            for row in model[stage]:
                print(f"  {stage:<7} batch {row['batch']}: dense {row['dense_tokens_per_s']:10.1f}  Monarch "
                      f"{row['monarch_tokens_per_s']:10.1f}  ratio {row['ratio']:.2f}×", flush=True)
        result["models"][path] = model
    return result


def smollm2_shaped() -> torch.nn.Module:
    """LlamaForCausalLM with SmolLM2-135M's shape (30 layers, 576 wide, MLP 1536, 9 query and
    3 key/value heads, 49,152-token tied vocabulary), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def bert_base(device: torch.device, warmup: int, repeat: int) -> tuple[dict, dict]:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    dense = BertForSequenceClassification(BertConfig(num_labels=2)).to(device)  # BERT-base sizes
    start = time.perf_counter()
    dense, monarch = model_bench.model_pair(dense, nblocks=4)
    print(f"\n(converted BERT-base at nblocks 4 in {time.perf_counter() - start:.1f} s on {device})")
    agreement = model_agreement(dense, monarch, device)
    result = {}
    for path in ("auto", "strided", "triton"):
        with kernels.use(path):
            result[path] = model_bench.models_benchmark(dense, monarch, batch=32, seq_len=128, dtype=torch.bfloat16,
                                                        device=device, warmup=warmup, repeat=repeat)
        inf, step = result[path]["inference"], result[path]["train_step"]
        print(f"== BERT-base classifier, batch 32×128, bfloat16, Monarch layers through {path} "
              "(targets: inference ≥2×, train step ≥1.5×) ==")
        print(f"  inference   dense {inf['dense_ms']:8.2f} ms  Monarch {inf['monarch_ms']:8.2f} ms  ratio {inf['ratio']:.2f}×")
        print(f"  train step  dense {step['dense_ms']:8.2f} ms  Monarch {step['monarch_ms']:8.2f} ms  ratio {step['ratio']:.2f}×",
              flush=True)
    return result, agreement


def gpt2_small_training(glue: Path, steps: int, out: Path) -> list[dict]:
    """The three variants of docs/training.md at GPT-2-small size, one after another."""
    import train_compare

    from monarchify import MonarchConfig
    from monarchify.lm.options import TrainOptions
    from monarchify.lm.train import train

    text = [glue / "SST-2" / "train.tsv", glue / "MRPC" / "train.tsv"]
    if not all(path.is_file() for path in text):
        print(f"\n(no GLUE text under {glue}: GPT-2-small training skipped)")
        return []
    common = dict(arch="gpt2", text=text, block_size=256, vocab_size=8192, batch_size=32, max_steps=steps,
                  learning_rate=6e-4, precision="bf16", eval_fraction=0.02, eval_steps=0.2, save_steps=float(steps),
                  logging_steps=5, seed=0, force=True)
    variants = {"dense": {}, "nb4": {"monarch": MonarchConfig(nblocks=4)},
                "nb4-dense": {"monarch": MonarchConfig(nblocks=4), "densify_at": 0.8}}
    runs = []
    for name, extra in variants.items():
        start = time.perf_counter()
        result = train(TrainOptions(**common, **extra, out=out / name), progress_bar=False)
        print(f"  ({name}: {time.perf_counter() - start:.0f} s)")
        runs.append(result.results)
    rows = train_compare.summarise(runs)
    print(f"== GPT-2 small from scratch, {steps} steps of 32×256 tokens, bf16 ==")
    train_compare.print_table(rows)
    return rows


def llama7b_streaming(layers: int, budget_s: float, work: Path, device: str = "cuda") -> dict:
    """Streaming conversion of a Llama-2-7B-shaped random checkpoint (benchmarks/synthetic_llama7b.py),
    projecting on the GPU: wall time, peak resident memory, output size and a reload-and-run
    check, each step in its own process under what is left of ``budget_s``. Outputs are deleted."""
    import os
    import re
    import shutil
    import signal
    import subprocess

    here = Path(__file__).resolve().parent
    source, out = work / f"llama7b-l{layers}", work / f"llama7b-l{layers}-monarch"
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    steps = {
        "write": [sys.executable, str(here / "synthetic_llama7b.py"), "write", str(source), "--layers", str(layers)],
        "convert": [*timer, sys.executable, "-m", "monarchify.cli.app", "convert", str(source), "--stream", "-b", "4",
                    "--device", device, "-o", str(out), "--force", "--json"],
        "check": [sys.executable, str(here / "synthetic_llama7b.py"), "check", str(out), "--source", str(source)],
    }
    result: dict = {"layers": layers, "device": device, "budget_s": budget_s}
    deadline = time.perf_counter() + budget_s
    print(f"\n== streaming conversion, Llama-2-7B shapes, {layers} layers, nblocks 4, projecting on {device} ==")
    try:
        for name, command in steps.items():
            left = deadline - time.perf_counter()
            if left <= 0:
                result[name] = {"skipped": "time budget spent"}
                print(f"  {name}: skipped (time budget spent)")
                continue
            start = time.perf_counter()
            # its own process group: /usr/bin/time's child must stop with it when the budget runs out
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
            try:
                stdout, stderr = process.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                result[name] = {"skipped": f"over the time budget ({budget_s:.0f} s)"}
                print(f"  {name}: stopped, over the time budget")
                break
            run = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
            entry = {"seconds": round(time.perf_counter() - start, 1), "exit": run.returncode}
            rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
            if rss:
                entry["peak_rss_gb"] = round(int(rss.group(1)) / 1e6, 2)
            if name == "convert" and out.is_dir():
                entry["output_gb"] = round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 2)
            if name == "write" and source.is_dir():
                entry["source_gb"] = round(sum(f.stat().st_size for f in source.glob("*.safetensors")) / 1e9, 2)
            if name == "check":
                entry["output"] = run.stdout.strip().splitlines()[-4:]
            result[name] = entry
            print(f"  {name}: {entry}")
            if run.returncode != 0:
                print(run.stderr[-2000:])
                break
    finally:
        shutil.rmtree(source, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        if work.is_dir() and not any(work.iterdir()):
            work.rmdir()
    result["ok"] = all(isinstance(result.get(n), dict) and result[n].get("exit") == 0 for n in steps)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed runs")
    parser.add_argument("--out", default="gpu_check.json", help="where to write every number as JSON")
    parser.add_argument("--train-steps", type=int, default=300, help="steps of each GPT-2-small training run (0: skip them)")
    parser.add_argument("--glue", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "glue",
                        help="GLUE TSV folder (SST-2/train.tsv, MRPC/train.tsv)")
    parser.add_argument("--train-out", type=Path, default=Path("runs/gpu_check_train"), help="output folders of those runs")
    parser.add_argument("--llama7b-layers", type=int, default=32,
                        help="depth of the Llama-2-7B-shaped streaming conversion (0: skip it; 32 is the real model)")
    parser.add_argument("--llama7b-budget-s", type=float, default=300,
                        help="time budget of that step in seconds (writing ~13.5 GB, converting, reloading)")
    parser.add_argument("--decode-model", type=Path, default=Path(__file__).resolve().parents[2] / "models" / "smollm2-135m",
                        help="dense causal LM folder for the decoding section (converted in memory; absent: layers only)")
    parser.add_argument("--llama7b-work", type=Path, default=Path("runs/gpu_check_llama7b"), help="scratch folder (deleted after)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated, run in this order: {', '.join(SECTIONS)}")
    args = parser.parse_args()
    sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        print("no CUDA GPU here: this script is for a GPU session (the CI machine checks the kernel with "
              "TRITON_INTERPRET=1, see tests/test_kernel_triton.py)", file=sys.stderr)
        return 2
    import triton

    device = torch.device("cuda")
    warmup, repeat = (3, 10) if args.quick else (10, 50)
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    runs = {
        "correctness": lambda: correctness("cuda"),
        "layers": lambda: layers(device, warmup, repeat),
        "decode": lambda: decode(device, warmup, repeat, args.decode_model),
        "bert_base": lambda: bert_base(device, warmup=max(3, warmup // 2), repeat=max(5, repeat // 3)),
        "training": lambda: gpt2_small_training(args.glue, args.train_steps, args.train_out) if args.train_steps > 0 else [],
        "llama7b": lambda: (llama7b_streaming(args.llama7b_layers, args.llama7b_budget_s, args.llama7b_work)
                            if args.llama7b_layers > 0 else {}),
    }
    results: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
                     "seconds": {}, "errors": {}}
    ok = True
    for name in sections:
        # A section that breaks is recorded and the rest still run: a GPU lease is short.
        start = time.perf_counter()
        try:
            value = runs[name]()
        except Exception as error:  # noqa: BLE001 - recorded, reported, and the exit status says so
            import traceback

            traceback.print_exc()
            results["errors"][name] = f"{type(error).__name__}: {error}"
            ok = False
        else:
            if name == "correctness":
                passed, value = value
                ok = ok and passed
            elif name == "bert_base":
                value, agreement = value
                results["model_agreement"] = agreement
                ok = ok and agreement["ok"]
            results[name] = value
        results["seconds"][name] = round(time.perf_counter() - start, 1)
        print(f"  ({name}: {results['seconds'][name]} s)", flush=True)
        # written after every section, so a run stopped at its time limit keeps what it measured
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    print(f"\nall numbers written to {args.out}; {'passed' if ok else 'FAILED (see above)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
