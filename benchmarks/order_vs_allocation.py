"""Is it the blocked output order or the budget's allocation that costs the blocked students?

Converts one fine-tuned dense classifier three ways, with the same calibration text and budget:

* ``interleaved``: the budget solved with interleaved layers (``compress``'s default);
* ``blocked-pinned``: blocked layers with the *interleaved* run's block counts and kept-dense
  layers pinned (its recorded recipe, order switched);
* ``blocked``: the budget solved again with blocked layers.

Each folder is written as ``OUT/<name>.stages/2-converted`` so that ``monarchify compress ...
--out OUT/<name>`` continues at stage 3 from it. Printed for each: the block counts that differ,
the mean held-out output error, and on the dev set before any fine-tuning the accuracy, the
agreement with the teacher's predictions and the cosine of the logits to the teacher's.

    python benchmarks/order_vs_allocation.py runs/mrpc/dense-lr1e-4-s0 --data-dir glue --out runs/mrpc
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from monarchify.config import CalibrationConfig, MonarchConfig
from monarchify.glue.compress import CONVERTED, _calibration_text
from monarchify.glue.data import load_glue
from monarchify.glue.tasks import get_task
from monarchify.hf.convert import convert_pretrained
from monarchify.hf.loading import load_model, load_tokenizer


@torch.no_grad()
def dev_logits(model, tokenizer, task, rows, batch=32):
    model.eval()
    fields = list(task.text_fields)
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        texts = [chunk[f] for f in fields]
        enc = tokenizer(*texts, truncation=True, max_length=128, padding=True, return_tensors="pt")
        out.append(model(**enc).logits)
    return torch.cat(out)


def summary(report, logits, teacher_logits, labels):
    rows = [layer for layer in report.layers]
    errors = [layer.extra.get("output_rel_error") for layer in rows if not layer.kept_dense]
    errors = [e for e in errors if e is not None]
    pred, teacher_pred = logits.argmax(-1), teacher_logits.argmax(-1)
    return {
        "blocks": {layer.name: (0 if layer.kept_dense else layer.nblocks) for layer in rows},
        "mean_heldout_output_error": sum(errors) / len(errors) if errors else None,
        "dev_accuracy": float((pred == labels).float().mean()),
        "agreement_with_teacher": float((pred == teacher_pred).float().mean()),
        "logit_cosine": float(torch.nn.functional.cosine_similarity(logits.flatten(), teacher_logits.flatten(), dim=0)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--task", default="mrpc")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--budget", type=float, default=0.37622)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--prefix", default="compress-")
    parser.add_argument("--suffix", default="-s0")
    args = parser.parse_args()

    task = get_task(args.task)
    data = load_glue(task, args.data_dir)
    dev = next(iter(data.eval.values()))  # the (first) dev split
    labels = torch.tensor(dev["label"])
    tokenizer = load_tokenizer(args.teacher)
    teacher_logits = dev_logits(load_model(args.teacher), tokenizer, task, dev)
    calibration = _calibration_text(task, Path(args.data_dir), args.samples)
    base = MonarchConfig(budget=args.budget, calibration=CalibrationConfig(samples=args.samples), output_order="interleaved")

    results = {}

    def run(name, recipe):
        folder = args.out / f"{args.prefix}{name}{args.suffix}.stages" / CONVERTED
        folder.parent.mkdir(parents=True, exist_ok=True)
        result = convert_pretrained(args.teacher, folder, recipe, calibration_data=calibration, force=True)
        results[name] = summary(result.report, dev_logits(result.model, tokenizer, task, dev), teacher_logits, labels)
        return result

    interleaved = run("interleaved", base)
    pinned = MonarchConfig.from_dict({**interleaved.report.meta["recipe"], "output_order": "blocked"})
    pinned = replace(pinned, calibration=base.calibration)
    run("blocked-pinned", pinned)
    run("blocked", replace(base, output_order="blocked"))

    reference = results["interleaved"]["blocks"]
    for name, result in results.items():
        differ = {k: (reference[k], v) for k, v in result.pop("blocks").items() if reference.get(k) != v}
        result["blocks_differing_from_interleaved"] = differ
    teacher_accuracy = float((teacher_logits.argmax(-1) == labels).float().mean())
    print(json.dumps({"teacher_dev_accuracy": teacher_accuracy, **results}, indent=1))


if __name__ == "__main__":
    main()
