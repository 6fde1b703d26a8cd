"""Does a sparse student run faster on this CPU? Dense matmul against torch's CSR sparse matmul.

The layers of SmolLM2-135M's decoder blocks (576 -> 1536 gate/up, 1536 -> 576 down, 576 -> 576
q/o), pruned by magnitude (``kdforge.models.sparsity.magnitude_masks``) to 50%, 70% and 90%
unstructured sparsity and to 2:4, applied to ``--tokens`` tokens (float32). For each: the dense
``x @ W.T`` with the zeros in it, and ``torch.sparse.mm`` of the weight stored as CSR. Medians of
``--repeats`` timed runs after one warm-up, in one process, one seed. torch's 2:4 kernels
(``to_sparse_semi_structured``) run on CUDA only; on the CPU a 2:4 weight can only go through CSR.

    .venv/bin/python benchmarks/compression/bench_sparse_kernels.py \
        --out benchmarks/compression/results-sparse-kernels.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

LAYERS = {"gate/up 576->1536": (1536, 576), "down 1536->576": (576, 1536), "q/o 576->576": (576, 576)}
PATTERNS = [("unstructured", 0.5), ("unstructured", 0.7), ("unstructured", 0.9), ("2:4", 0.5)]


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from torch import nn

    from kdforge.models.sparsity import magnitude_masks

    torch.manual_seed(0)
    rows = []
    for layer, (out_features, in_features) in LAYERS.items():
        x = torch.randn(args.tokens, in_features)
        for pattern, target in PATTERNS:
            # one linear layer inside a one-block "model", so the masks are the run's own function's
            block = nn.Module()
            block.model = nn.Module()
            block.model.layers = nn.ModuleList([nn.Module()])
            block.model.layers[0].proj = nn.Linear(in_features, out_features, bias=False)
            block.config = type("C", (), {"num_hidden_layers": 1})()
            mask = magnitude_masks(block, target, pattern)["model.layers.0.proj"]
            weight = block.model.layers[0].proj.weight.detach() * mask
            csr = weight.to_sparse_csr()
            dense_s = timed(lambda x=x, w=weight: x @ w.T, args.repeats)
            sparse_s = timed(lambda x=x, c=csr: torch.sparse.mm(c, x.T).T, args.repeats)
            result = torch.sparse.mm(csr, x.T).T
            assert torch.allclose(result, x @ weight.T, atol=1e-4)
            rows.append(
                {
                    "layer": layer,
                    "pattern": pattern if pattern == "2:4" else f"{target:.0%}",
                    "sparsity": float((weight == 0).float().mean()),
                    "dense_ms": dense_s * 1e3,
                    "csr_ms": sparse_s * 1e3,
                    "speedup": dense_s / sparse_s,
                }
            )
            r = rows[-1]
            print(
                f"| {layer} | {r['pattern']} | {r['sparsity']:.2f} | {r['dense_ms']:.2f} | {r['csr_ms']:.2f} |"
                f" {r['speedup']:.2f} |",
                flush=True,
            )
    if args.out:
        meta = {
            "command": " ".join(sys.argv),
            "tokens": args.tokens,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        args.out.write_text(json.dumps({**meta, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
