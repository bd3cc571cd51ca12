"""Greedy and beam search equal Hugging Face `generate` token for token, on random-init GPT-2 and LLaMA
models loaded through llmjax.io (float32, CPU)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from llmjax.infer.beam import beam_search  # noqa: E402
from llmjax.infer.generate import generate  # noqa: E402
from llmjax.io import load_hf_checkpoint  # noqa: E402

VOCAB = 97
PROMPTS = [[5, 17, 3, 44, 2, 9, 60], [8, 1], [33, 21, 70, 12]]


def _ready(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.float().eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_inner=80, n_positions=64)
    return _ready(transformers.GPT2LMHeadModel(config))


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64)
    return _ready(transformers.LlamaForCausalLM(config))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request, tmp_path_factory):
    model = {"gpt2": gpt2, "llama": llama}[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    params, cfg = load_hf_checkpoint(folder)
    return model, params, cfg


def hf_generate(model, prompt, eos_id, **kw):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             eos_token_id=eos_id, pad_token_id=eos_id if eos_id is not None else 0, **kw)
    return out.numpy()[:, len(prompt):]


def strip(row, length):
    return [int(t) for t in row[:length]]


def test_greedy_equals_hf_generate(models):
    model, params, cfg = models
    # EOS: an id the greedy continuation of prompt 0 produces at its 4th step: that row must stop there.
    eos = int(hf_generate(model, PROMPTS[0], None, max_new_tokens=6, do_sample=False)[0, 3])
    ours = generate(params, cfg, PROMPTS, max_new_tokens=12, eos_id=eos)
    for prompt, tokens in zip(PROMPTS, ours.tokens):
        want = hf_generate(model, prompt, eos, max_new_tokens=12, do_sample=False)[0]
        assert tokens == strip(want, len(tokens))
        assert len(tokens) == 12 or tokens[-1] == eos
    assert len(ours.tokens[0]) == 4 and ours.finish_reasons[0] == "eos"


# Every length penalty and stopping rule once, and both models (each case compiles its own search: CI time).
@pytest.mark.parametrize("models,length_penalty,early_stopping",
                         [("llama", 1.0, False), ("gpt2", 0.5, True), ("gpt2", 2.0, "never")], indirect=["models"])
def test_beam_search_equals_hf_generate(models, length_penalty, early_stopping):
    model, params, cfg = models
    eos = int(hf_generate(model, PROMPTS[1], None, max_new_tokens=3, do_sample=False)[0, 2])  # finishes some beams
    ours = beam_search(params, cfg, PROMPTS, num_beams=4, max_new_tokens=10, eos_id=eos,
                       length_penalty=length_penalty, early_stopping=early_stopping)
    for prompt, hypotheses, scores in zip(PROMPTS, ours.sequences, ours.scores):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 num_beams=4, num_return_sequences=4, max_new_tokens=10, do_sample=False,
                                 eos_token_id=eos, pad_token_id=eos, length_penalty=length_penalty,
                                 early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True)
        want = out.sequences.numpy()[:, len(prompt):]
        for h, tokens in enumerate(hypotheses):
            assert tokens == strip(want[h], len(tokens)), (h, tokens, want[h])
            assert all(t == eos for t in want[h][len(tokens):])
        np.testing.assert_allclose(scores, out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
