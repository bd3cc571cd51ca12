"""BERT import / export against transformers' BertModel: tiny random encoders of awkward sizes, hidden states compared
on a padded batch of unequal lengths with token types, files round-tripped both ways, and bad configs."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.config import get_config  # noqa: E402
from llmjax.io import CheckpointMismatchError, config_from_hf, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from llmjax.model import hidden_states, init_params  # noqa: E402
from llmjax.model.pooling import pool  # noqa: E402

VOCAB = 91
LENGTHS = [13, 9, 4]  # a padded batch: [batch, 13]
rng = np.random.default_rng(0)
TOKENS = rng.integers(0, VOCAB, (len(LENGTHS), max(LENGTHS)))  # [batch, seq]
MASK = np.arange(max(LENGTHS))[None] < np.array(LENGTHS)[:, None]  # [batch, seq]: True at real tokens


def bert(model_class=None, **overrides):
    """A random BertModel with noise on every parameter (fresh biases are zero, norms one: a mix-up would hide)."""
    settings = dict(vocab_size=VOCAB, hidden_size=36, num_hidden_layers=3, num_attention_heads=6, intermediate_size=52,
                    max_position_embeddings=40, type_vocab_size=3)
    torch.manual_seed(0)
    model = (model_class or transformers.BertModel)(transformers.BertConfig(**settings | overrides))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


MODELS = {
    "bert": bert,
    "gelu_tanh_wide_heads": lambda: bert(hidden_size=40, num_attention_heads=2, intermediate_size=24,
                                         hidden_act="gelu_new", layer_norm_eps=1e-7, num_hidden_layers=2),
    "one_layer_one_type": lambda: bert(num_hidden_layers=1, type_vocab_size=1, hidden_act="gelu_python"),
}


def hf_hidden(model, token_types) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(TOKENS), token_type_ids=torch.from_numpy(token_types),
                     attention_mask=torch.from_numpy(MASK.astype(np.int64))).last_hidden_state.numpy()


def assert_hidden_match(expected, params, cfg, token_types) -> float:
    """Hidden states at the real tokens agree to float32 rounding; returns the largest difference."""
    ours = np.asarray(hidden_states(params, jnp.asarray(TOKENS), cfg, token_types=jnp.asarray(token_types),
                                    token_mask=jnp.asarray(MASK)))
    error = float(np.abs((ours - expected)[MASK]).max())
    assert error < 1e-5, f"max |hidden difference| {error:.3g}"
    return error


@pytest.mark.parametrize("name", MODELS)
def test_import_matches_transformers_on_a_padded_batch(name, tmp_path):
    model = MODELS[name]()
    model.save_pretrained(tmp_path)  # with its pooler and position-id buffer, which we skip
    params, cfg = load_hf_checkpoint(tmp_path)
    assert (cfg.causal, cfg.norm_position, cfg.embedding_norm) == (False, "post", True)
    assert "final_norm" not in params and "lm_head" not in params
    token_types = rng.integers(0, model.config.type_vocab_size, TOKENS.shape)
    assert_hidden_match(hf_hidden(model, token_types), params, cfg, token_types)
    # mean pooling over the real tokens, as sentence-transformers does it
    expected = hf_hidden(model, token_types)
    pooled = (expected * MASK[..., None]).sum(1) / MASK.sum(1, keepdims=True)
    ours = pool(hidden_states(params, jnp.asarray(TOKENS), cfg, token_types=jnp.asarray(token_types),
                              token_mask=jnp.asarray(MASK)), jnp.asarray(MASK), "mean")
    np.testing.assert_allclose(np.asarray(ours), pooled, atol=1e-5)


def test_padding_does_not_change_a_sequence(tmp_path):
    """Each row of the padded batch equals the same sequence run alone, unpadded."""
    bert().save_pretrained(tmp_path)
    params, cfg = load_hf_checkpoint(tmp_path)
    batch = np.asarray(hidden_states(params, jnp.asarray(TOKENS), cfg, token_mask=jnp.asarray(MASK)))
    for row, length in enumerate(LENGTHS):
        alone = np.asarray(hidden_states(params, jnp.asarray(TOKENS[row:row + 1, :length]), cfg))[0]
        np.testing.assert_allclose(batch[row, :length], alone, atol=1e-5)


def test_a_task_model_loads_its_encoder(tmp_path):
    """BertForMaskedLM keeps the encoder under "bert." beside its head ("cls."): the encoder is read, the head
    skipped."""
    model = bert(transformers.BertForMaskedLM)
    model.save_pretrained(tmp_path)
    params, cfg = load_hf_checkpoint(tmp_path)
    token_types = np.zeros_like(TOKENS)
    assert_hidden_match(hf_hidden(model.bert, token_types), params, cfg, token_types)


def test_export_loads_in_transformers_and_round_trips(tmp_path):
    cfg = get_config("bert-tiny")
    params = init_params(cfg, __import__("jax").random.key(2))
    save_hf_checkpoint(params, cfg, tmp_path / "ours")
    model = transformers.BertModel.from_pretrained(tmp_path / "ours", add_pooling_layer=False).float().eval()
    token_types = rng.integers(0, 2, TOKENS.shape)
    assert_hidden_match(hf_hidden(model, token_types), params, cfg, token_types)
    reloaded, reloaded_cfg = load_hf_checkpoint(tmp_path / "ours", cfg)
    assert reloaded_cfg == cfg
    np.testing.assert_array_equal(np.asarray(reloaded["embed"]["token_type"]),
                                  np.asarray(params["embed"]["token_type"]))


def test_bad_configs_get_one_clear_error(tmp_path):
    base = json.loads(bert().config.to_json_string())
    for key, value, message in [("position_embedding_type", "relative_key", "position_embedding_type"),
                                ("hidden_act", "relu", "hidden_act"), ("is_decoder", True, "is_decoder")]:
        with pytest.raises(CheckpointMismatchError, match=message):
            config_from_hf(base | {key: value})
    bert().save_pretrained(tmp_path)
    with pytest.raises(CheckpointMismatchError, match="type_vocab_size"):
        load_hf_checkpoint(tmp_path, config_from_hf(base).replace(type_vocab_size=2))
    with pytest.raises(ValueError, match="BERT layout"):
        save_hf_checkpoint({}, get_config("bert-tiny", embedding_norm=False), tmp_path / "x")
