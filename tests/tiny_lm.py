"""Tiny causal LMs for tests: a byte-level BPE tokenizer with a chat template, random Llamas, a GGUF file.

Everything is built in well under a second, so causal-LM tests need no download and
no real model. The GGUF writer lays out a Llama the way llama.cpp does (the tensor
and metadata names transformers' GGUF loader reads), so the GGUF code paths (a model
marked quantized that ``save_pretrained`` refuses) are exercised for real.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

# A public-domain passage (Hamlet, III.1), enough text to train a few hundred BPE merges.
TEXT = """To be, or not to be, that is the question:
Whether 'tis nobler in the mind to suffer
The slings and arrows of outrageous fortune,
Or to take arms against a sea of troubles
And by opposing end them. To die, to sleep,
No more; and by a sleep to say we end
The heart-ache and the thousand natural shocks
That flesh is heir to: 'tis a consummation
Devoutly to be wish'd. To die, to sleep;
To sleep, perchance to dream, ay, there's the rub:
For in that sleep of death what dreams may come,
When we have shuffled off this mortal coil,
Must give us pause, there's the respect
That makes calamity of so long life.
"""

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(text: str = TEXT, vocab_size: int = 300, chat_template: bool = True):
    """A byte-level BPE tokenizer (so any text encodes without unknown tokens) with pad/bos/eos."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_llama(vocab_size: int, *, layers: int = 4, hidden: int = 32, tied: bool = False, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Random weights at the default 0.02 scale give near-uniform predictions; larger ones
    # make teacher and student disagree visibly, so fidelity and KD have something to do.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_llama(folder: Path, tokenizer, **kwargs) -> Path:
    """A tiny Llama and ``tokenizer`` saved as a transformers folder."""
    model = make_llama(len(tokenizer), **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_gguf(path: Path, tokenizer, *, layers: int = 4, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny Llama with ``tokenizer``'s vocabulary as an F32 GGUF file (llama.cpp's names)."""
    from gguf import GGUFWriter

    state = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(state["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    heads, kv_heads, ffn = 4, 2, 2 * hidden
    head_dim = hidden // heads
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_pad_token_id(tokens.index("<pad>"))
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_chat_template(CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)

    def tensor(name: str, *shape: int) -> None:
        scale = 1.0 if len(shape) == 1 else 0.2  # norms at 1, matrices like make_llama's
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * scale
        writer.add_tensor(name, values.astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden)
    tensor("output_norm.weight", hidden)
    tensor("output.weight", len(tokens), hidden)
    for b in range(layers):
        tensor(f"blk.{b}.attn_norm.weight", hidden)
        tensor(f"blk.{b}.attn_q.weight", hidden, hidden)
        tensor(f"blk.{b}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{b}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{b}.attn_output.weight", hidden, hidden)
        tensor(f"blk.{b}.ffn_norm.weight", hidden)
        tensor(f"blk.{b}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{b}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{b}.ffn_down.weight", hidden, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
