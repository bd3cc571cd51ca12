"""The tuned tile tables (kernels/tuning/*.json): what the kernels load equals what they used as code constants,
and a missing or corrupt file is one clear error naming it."""

import json

import pytest

from llmjax.kernels import norms, tuning
from llmjax.kernels.flash_attention import autotune
from llmjax.kernels.flash_attention.config import KernelConfig


def test_norm_tables_match_the_former_constants():
    assert norms.FORWARD_DEFAULTS == {"tile_elements": 8192, "max_warps": 8, "num_stages": 1, "one_pass": False}
    assert norms.BACKWARD_DEFAULTS == {"tile_elements": 4096, "max_warps": 16, "num_stages": 2,
                                       "programs_per_multiprocessor": 2}
    assert norms.WIDTH_DEFAULTS == {
        ("forward", 1024): {"tile_elements": 16384, "num_warps": 16},
        ("backward", 1024): {"tile_elements": 4096, "num_warps": 4},
        ("forward", 4096): {"tile_elements": 8192, "num_warps": 8, "one_pass": True},
        ("forward", 8192): {"tile_elements": 8192, "num_warps": 8, "one_pass": True},
    }
    assert norms.pass_defaults("forward", 768) == {"tile_elements": 16384, "max_warps": 8, "num_stages": 1,
                                                   "one_pass": False, "num_warps": 16}


def test_flash_attention_candidates_match_the_former_constants():
    bf16, f32 = "bfloat16", "float32"
    assert autotune.candidates("forward", 128, bf16)[:2] == (KernelConfig(128, 64, 8, 3), KernelConfig(128, 128, 8, 3))
    assert autotune.candidates("forward", 64, bf16)[0] == KernelConfig(64, 64, 4, 3)
    assert autotune.candidates("dkv", 128, bf16)[0] == KernelConfig(64, 128, 8, 2)
    assert autotune.candidates("dq", 256, bf16) == (KernelConfig(64, 32, 8, 2), KernelConfig(64, 64, 8, 2),
                                                    KernelConfig(32, 64, 4, 2))
    assert autotune.candidates("dq", 80, bf16)[0] == KernelConfig(128, 64, 8, 3)  # the next listed head_dim: 128
    assert autotune.candidates("dkv", 64, f32) == (KernelConfig(32, 64, 4, 2), KernelConfig(32, 32, 4, 2))
    assert [len(autotune.candidates(which, 128, bf16)) for which in autotune.KERNELS] == [5, 5, 4]


def test_every_table_names_its_device():
    for path in sorted(tuning.TUNING_DIR.glob("*.json")):
        data = json.loads(path.read_text())
        assert data["device"] and data["tables"], path


def test_missing_table_names_the_file(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(tuning.TuningTableError, match=f"{path}.*missing"):
        tuning.load_tables("norms", path)


@pytest.mark.parametrize("text, problem", [("{not json", "cannot be read"), ('{"tables": {}}', "device"),
                                           ('{"device": "x", "tables": []}', "tables")])
def test_corrupt_table_names_the_file(tmp_path, text, problem):
    path = tmp_path / "norms.json"
    path.write_text(text)
    with pytest.raises(tuning.TuningTableError, match=problem) as error:
        tuning.load_tables("norms", path)
    assert str(path) in str(error.value)


def test_table_without_an_expected_entry_names_file_and_key():
    with pytest.raises(tuning.TuningTableError, match=r"norms\.json lacks backward"):
        norms.width_defaults({"forward": {"by_padded_width": {}}})
    assert tuning.table_entry({"forward": {"defaults": {}}}, ("forward", "defaults"), "norms") == {}
