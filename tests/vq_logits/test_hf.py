"""replace_lm_head on real transformers models: exact loss without logits, generate, save/load round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from leanfit.studies.models.tiny_llama import tiny_llama
from leanfit.vq_logits.hf import from_pretrained, replace_lm_head
from tests.tolerances import assert_close

V = 300


def _llama(tied: bool):
    return tiny_llama(V, d_model=32, n_layers=2, n_heads=2, seed=0, tie_embeddings=tied).double().eval()


def _gpt2():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0,
                        eos_token_id=0, pad_token_id=1)
    return GPT2LMHeadModel(config).double().eval()


MODELS = {"llama-untied": (lambda: _llama(False), 0), "llama-tied": (lambda: _llama(True), 0), "gpt2": (_gpt2, 0),
          "llama-residual": (lambda: _llama(False), 4)}


@pytest.fixture(params=list(MODELS))
def vq_model(request):
    build, rank = MODELS[request.param]
    counts = torch.rand(V, generator=torch.Generator().manual_seed(1)) * 100
    # a unigram bias breaks the ties inside each cluster, so greedy decoding (and top_k=1) has one answer
    model = replace_lm_head(build(), 24, mapping="equal_mass", counts=counts, residual_rank=rank, bias_init="unigram")
    if rank:
        with torch.no_grad():
            model.get_output_embeddings().residual_emb.normal_(generator=torch.Generator().manual_seed(2))
    return model


def _ids(batch=3, length=10, seed=0):
    return torch.randint(2, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_loss_matches_cross_entropy_of_materialised_logits(vq_model):
    x = _ids()
    labels = x.clone()
    labels[0, :4] = -100  # prompt tokens masked as in completion-only training
    out = vq_model(input_ids=x, labels=labels)
    assert out.logits is None  # the loss path never builds N x V logits
    logits = vq_model(input_ids=x).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, ref)
    shifted = vq_model(input_ids=x[:, :-1], shift_labels=labels[:, 1:]).loss  # the LM training loop's form
    ref_short = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(shifted, ref_short)
    n_items = int((labels[:, 1:] != -100).sum())
    summed = vq_model(input_ids=x, labels=labels, num_items_in_batch=2 * n_items).loss
    assert_close(summed, ref / 2)


def test_loss_gradients_equal_those_of_materialised_logits(vq_model):
    """Every parameter's gradient (head and trunk) from the collapsed loss equals the one from cross entropy of
    the materialised logits."""
    x, labels = _ids(), _ids(seed=1)
    params = [p for p in vq_model.parameters() if p.requires_grad]
    got = torch.autograd.grad(vq_model(input_ids=x, labels=labels).loss, params, allow_unused=True)
    logits = vq_model(input_ids=x).logits
    ref_loss = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    expected = torch.autograd.grad(ref_loss, params, allow_unused=True)
    names = [n for n, p in vq_model.named_parameters() if p.requires_grad]
    for name, g, r in zip(names, got, expected, strict=True):
        assert (g is None) == (r is None), name
        if g is not None:
            assert_close(g, r, msg=name)
    head, by_param = vq_model.get_output_embeddings(), {id(p): g for p, g in zip(params, got, strict=True)}
    for p in (head.codebook, head.bias, vq_model.get_input_embeddings().weight):  # the gradient reaches them
        assert by_param[id(p)].abs().max() > 0


def test_greedy_generate_matches_transformers_on_materialised_logits(vq_model):
    x = _ids(length=7)
    mask = torch.ones_like(x)
    x[0, :3], mask[0, :3] = 1, 0  # a left-padded row
    fast = vq_model.generate(input_ids=x, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    slow = super(type(vq_model), vq_model).generate(input_ids=x, attention_mask=mask, max_new_tokens=8,
                                                    do_sample=False, pad_token_id=1)
    assert torch.equal(fast, slow)


def test_generate_stops_at_eos_and_pads_finished_rows(vq_model):
    x = _ids(batch=2, length=5)
    first = vq_model.generate(input_ids=x, max_new_tokens=1, do_sample=False)[:, -1]
    out = vq_model.generate(input_ids=x, max_new_tokens=6, do_sample=False, eos_token_id=int(first[0]),
                            pad_token_id=1)
    assert int(out[0, 5]) == int(first[0]) and torch.all(out[0, 6:] == 1)


def test_sampled_generate_is_reproducible_and_top_k_1_is_greedy(vq_model):
    x = _ids(batch=2, length=5)
    draw = lambda: vq_model.generate(x, max_new_tokens=6, do_sample=True, top_p=0.9, temperature=0.8,  # noqa: E731
                                     generator=torch.Generator().manual_seed(3))
    a = draw()
    assert torch.equal(a, draw()) and a.shape == (2, 11) and int(a.max()) < V
    greedy = vq_model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(vq_model.generate(x, max_new_tokens=6, do_sample=True, top_k=1), greedy)


def test_save_and_load_round_trip(vq_model, tmp_path):
    x = _ids()
    vq_model.save_pretrained(tmp_path)
    loaded = from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(loaded).__name__ == type(vq_model).__name__
    assert torch.equal(loaded.get_output_embeddings().mapping, vq_model.get_output_embeddings().mapping)
    assert torch.equal(loaded(input_ids=x).logits, vq_model(input_ids=x).logits)


def test_models_without_a_linear_output_layer_are_refused():
    from transformers import BertConfig, BertModel

    encoder = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32))
    with pytest.raises(ValueError, match=r"model=BertModel has no recognisable output layer"):
        replace_lm_head(encoder, 4)


def test_logit_softcapping_is_refused():
    model = _llama(False)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 transforms the logits"):
        replace_lm_head(model, 4, mapping="contiguous")


def test_loading_a_plain_model_folder_explains(tmp_path):
    _llama(False).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="config has no 'vq_logits' entry"):
        from_pretrained(tmp_path)
