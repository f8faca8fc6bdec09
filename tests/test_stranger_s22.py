"""Session 22, a stranger's models the explorer had not met: OPT-350m's layout, whose `project_in`/`project_out` (the
Linear layers between the embedding width and the hidden width) lie outside every block. With `modules='all'` the
explorer refused the model outright ("the explorer's `blocks` range needs a block number in every layer name"), even
with no range chosen; it now counts them with all blocks, leaves them out of a narrower range, and charts them as
'other'. Each score is checked against autograd over the layers counted (`strategy='identity'`)."""
import importlib, json, warnings
import numpy as np, pytest, torch, transformers
import influence_nb as inf
from influence_nb.modules import find_modules, layer_param_names

ex = importlib.import_module('influence_nb.explorer')
V = 40


def opt(seed=0):
    torch.manual_seed(seed)
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=V, hidden_size=32, word_embed_proj_dim=16, ffn_dim=24, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)).eval()


@pytest.fixture(scope='module')
def session(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = 'the a red blue fox king river tower lives in north south east west valley hill .'.split()
    vocab = {'<unk>': 0, '<pad>': 1, '</s>': 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>')); tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>', pad_token='<pad>', eos_token='</s>')
    g = np.random.default_rng(0)
    texts = [' '.join(g.choice(words[:-1], int(g.integers(5, 10)))) + ' .' for _ in range(24)]
    d = tmp_path_factory.mktemp('s22')
    (d/'corpus.jsonl').write_text(''.join(json.dumps({'id': f'r{i}', 'text': t}) + '\n' for i, t in enumerate(texts)))
    s = ex.ExplorerSession(model=opt(), tokenizer=tok, corpus=str(d/'corpus.jsonl'), queries=[('the red fox lives in the', 'north valley .')],
                           fit_sample=0, modules='all', name='opt')
    return s


def autograd(model, names, query, train):
    P = dict(model.named_parameters()); ps = [P[n] for n in names]
    def grad(s):
        ids, lab = s['input_ids'], s['labels'][1:]
        lp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1); keep = lab != -100
        return torch.cat([x.reshape(-1) for x in torch.autograd.grad(lp[keep].gather(-1, lab[keep][:, None]).sum(), ps)]).double()
    return (torch.stack([grad(s) for s in train]) @ grad(query)).numpy()


def test_layers_outside_every_block_count_with_all_blocks_and_match_autograd(session):
    mdl, tok = session.model('opt')
    outside = ['model.decoder.project_in', 'model.decoder.project_out']
    assert set(outside) <= {layer.name for layer in find_modules(mdl, 'all', warn=False)}
    q = session.queries[0]['id']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = ex.run_query(session, model='opt', query_id=q, prefilter=False, k=24, strategy='identity')   # refused before
        train, query = session.train('opt'), ex._query_sequence(session.queries[0], mdl, tok, 'opt')
    assert set(outside) <= set(res.layers) and res.layers == res.all_layers      # every tracked layer counts
    assert {res.block_of[n] for n in outside} == {None} and res.blocks == (0, 1)
    names = layer_param_names(find_modules(mdl, res.layers, warn=False))
    want = autograd(mdl, names, query[0], train)
    got = res.per_layer[res.layers].sum(axis=1).to_numpy()
    assert float(np.abs(got - want).max()) <= 1e-5 * float(np.abs(want).max())
    top = res.top.sort_values('train_index')
    assert np.allclose(top['score'].to_numpy(), want[top['train_index'].to_numpy()], rtol=0, atol=1e-5 * float(np.abs(want).max()))
    assert list(res.top['train_index'])[:5] == list(np.lexsort((np.arange(len(want)), -want))[:5])
    # the chart: a column per block and one for the layers outside them, adding up to each sequence's score
    fig = ex.layer_figure(res)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['block 0', 'block 1', 'other']


def test_a_narrower_range_leaves_the_layers_outside_blocks_out(session):
    mdl, tok = session.model('opt')
    q = session.queries[0]['id']
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        res = ex.run_query(session, model='opt', query_id=q, prefilter=False, k=24, strategy='identity', blocks=(1, 1))
        train, query = session.train('opt'), ex._query_sequence(session.queries[0], mdl, tok, 'opt')
    assert res.layers and all(n.startswith('model.decoder.layers.1.') for n in res.layers)
    want = autograd(mdl, layer_param_names(find_modules(mdl, res.layers, warn=False)), query[0], train)
    assert float(np.abs(res.scores - want[res.candidates]).max()) <= 1e-5 * float(np.abs(want).max())
    assert [t.get_text() for t in ex.layer_figure(res).axes[0].get_xticklabels()] == ['block 1']


def test_a_numbered_layer_outside_the_blocks_is_no_block():
    "Gemma 3n's `altup_projections.0` (a model-level list) was counted as block 0 by its name."
    cfg = transformers.Gemma3nTextConfig(vocab_size=V, vocab_size_per_layer_input=V, hidden_size=16, hidden_size_per_layer_input=4,
        intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        layer_types=['sliding_attention', 'full_attention'], sliding_window=16, num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0], laurel_rank=2, altup_num_inputs=2)
    m = transformers.AutoModelForCausalLM.from_config(cfg)
    names = ['model.altup_projections.0', 'model.layers.1.mlp.up_proj', 'model.per_layer_model_projection']
    assert ex.layer_blocks(names, m) == [None, 1, None]
