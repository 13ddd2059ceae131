"""The checkpoint loader refuses what the decoder cannot represent, with a message naming the
config field or the tensor, and skips what it does not need without reading it.

Each test starts from a tiny random transformers DeepSeek-V3 model saved with ``save_pretrained``
(it loads: test_model_parity.py checks its logits) and changes one thing.
"""

import json
import shutil
import sys

import pytest
import torch

pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_model_parity import make_hf_model  # noqa: E402
from torch_mla.models.checkpoint import CheckpointError, load_checkpoint, load_tokenizer  # noqa: E402

SHARD = "model.safetensors"
KV_B = "model.layers.1.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("v3")
    make_hf_model("v3-yarn").save_pretrained(path)
    return path


@pytest.fixture
def folder(saved, tmp_path):
    """A fresh copy of the saved model, and functions that change its config and its tensors."""
    path = tmp_path / "ckpt"
    shutil.copytree(saved, path)

    class Folder:
        def config(self, **changes):
            config = json.loads((path / "config.json").read_text())
            config.update(changes)
            (path / "config.json").write_text(json.dumps(config))

        def tensors(self, change):
            tensors = safetensors_torch.load_file(path / SHARD)
            change(tensors)
            safetensors_torch.save_file(tensors, path / SHARD, metadata={"format": "pt"})

        def load(self):
            return load_checkpoint(str(path))

    Folder.path = path
    return Folder()


def test_the_unchanged_folder_loads(folder):
    assert folder.load().args.n_layers == 3


def test_a_head_count_that_disagrees_with_the_weights_names_the_tensor_and_fields(folder):
    folder.config(num_attention_heads=8)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.\d\.self_attn\.\w+\.weight: shape"):
        folder.load()


def test_kv_b_proj_of_the_wrong_shape_names_the_config_fields(folder):
    folder.tensors(lambda t: t.update({KV_B: t[KV_B][:-4]}))
    with pytest.raises(CheckpointError, match=rf"{KV_B}.*num_attention_heads=4.*v_head_dim=24"):
        folder.load()


def test_layers_beyond_the_config_are_refused(folder):
    folder.config(num_hidden_layers=2, num_nextn_predict_layers=0)
    with pytest.raises(CheckpointError, match="layer 2 is beyond num_hidden_layers=2"):
        folder.load()


def test_multi_token_prediction_layers_are_skipped_without_being_read(folder, monkeypatch):
    folder.config(num_hidden_layers=2, num_nextn_predict_layers=1)  # layer 2 is now the MTP layer
    import safetensors

    read = []
    real_open = safetensors.safe_open

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    assert folder.load().args.n_layers == 2
    assert read and not [n for n in read if n.startswith("model.layers.2.")]


@pytest.mark.parametrize("quant", [{"quant_method": "awq", "bits": 4}, {"quant_method": "gptq"},
                                   {"quant_method": "fp8", "activation_scheme": "static"}])
def test_quantization_other_than_block_fp8_is_refused(folder, quant):
    folder.config(quantization_config=quant)
    with pytest.raises(CheckpointError, match="quantization_config"):
        folder.load()


def test_an_fp8_weight_scale_of_another_format_is_refused_not_loaded_unscaled(folder):
    name = "model.layers.0.self_attn.o_proj.weight"

    def per_tensor_fp8(t):
        t[name + "_scale"] = t[name].abs().max().reshape(1)
        t[name] = (t[name] / t[name + "_scale"]).to(torch.float8_e4m3fn)

    folder.tensors(per_tensor_fp8)
    with pytest.raises(CheckpointError, match=rf"{name}_scale: quantization scales"):
        folder.load()


def test_an_fp8_weight_without_its_scale_is_refused(folder):
    name = "model.layers.0.self_attn.o_proj.weight"
    folder.tensors(lambda t: t.update({name: t[name].to(torch.float8_e4m3fn)}))
    with pytest.raises(CheckpointError, match=rf"{name} is torch.float8_e4m3fn without a {name}_scale_inv"):
        folder.load()


def test_a_scale_inv_without_its_weight_is_refused(folder):
    folder.tensors(lambda t: t.update({"model.layers.0.mlp.extra.weight_scale_inv": torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match="weight_scale_inv scales no weight"):
        folder.load()


def test_a_block_scale_grid_of_the_wrong_shape_is_refused(folder):
    name = "model.layers.0.self_attn.o_proj.weight"

    def bad_grid(t):
        t[name] = t[name].to(torch.float8_e4m3fn)
        t[name + "_scale_inv"] = torch.ones(3, 3)

    folder.tensors(bad_grid)
    with pytest.raises(CheckpointError, match=r"_scale_inv: shape \(3, 3\), expected \(1, 1\)"):
        folder.load()


def test_moe_layer_freq_other_than_1_is_refused(folder):
    folder.config(moe_layer_freq=2)
    with pytest.raises(CheckpointError, match="moe_layer_freq=2"):
        folder.load()


@pytest.mark.parametrize("rope, field", [
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "low_freq_factor": 1.0},
     "low_freq_factor"),
    ({"rope_type": "default", "rope_theta": 10000.0, "factor": 2.0}, "factor"),
    ({"rope_type": "llama3", "factor": 8.0}, "llama3"),
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
])
def test_rope_scaling_the_model_does_not_implement_is_refused(folder, rope, field):
    folder.config(rope_parameters=rope)
    with pytest.raises(CheckpointError, match=f"rope_scaling.*{field}"):
        folder.load()


def test_a_tensor_with_no_place_in_the_model_is_refused(folder):
    folder.tensors(lambda t: t.update({"model.layers.0.self_attn.q_b_proj.bias": torch.zeros(4)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.q_b_proj\.bias has no place"):
        folder.load()


def test_a_tokenizer_without_transformers_names_the_hf_extra(folder, monkeypatch):
    (folder.path / "tokenizer_config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install torch-mla\[hf\]"):
        load_tokenizer(str(folder.path))


def test_reading_weights_without_safetensors_names_the_hf_extra(folder, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install torch-mla\[hf\]"):
        folder.load()
