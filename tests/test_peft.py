"""Models carrying peft adapters (LoRA, DoRA): `modules='mlp'` / `'all'` track the base layers, whose gradient under plain
LoRA is the merged weight's, so scores equal those of the merged model; `modules='lora'` tracks the adapter matrices A
and B, checked against autograd; adapters that do more than add (DoRA) are refused for the base weights; an adapter
folder loads with its base model, through the API and the command line."""
import copy, json, warnings
import pytest, torch
import transformers
import influence_nb as inf
import randdata
from influence_nb.modules import find_modules, tiny_model, adapter_parts

from peft import LoraConfig, PeftModel, get_peft_model
from influence_nb.pbrf import keep_precision

transformers.logging.set_verbosity_error()
TARGETS = {'llama': ['q_proj', 'v_proj', 'up_proj', 'down_proj'], 'gpt2': ['c_attn', 'c_fc']}

def lora_model(family='llama', layers=2, dora=False, seed=0):
    "A float64 tiny model of `family` with a LoRA (or DoRA) adapter whose B is random (not zero, as after training)."
    torch.manual_seed(seed)
    base = tiny_model(family, layers=layers).double()
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS[family], use_dora=dora,
                     init_lora_weights=False, fan_in_fan_out=family == 'gpt2')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')                   # peft's note on fan_in_fan_out for Conv1D
        return get_peft_model(base, cfg).eval()          # eval: the autograd references run without LoRA's dropout

def merged_name(n): return n.removeprefix('base_model.model.').replace('.base_layer', '')

def data():
    return randdata.rand_seqs(6, hi=12, top=30), randdata.rand_seqs(2, lo=6, hi=10, top=30, seed=1, prompt=3)

@pytest.mark.parametrize('family', ['llama', 'gpt2'])
@pytest.mark.parametrize('modules', ['mlp', 'all'])
def test_base_layers_of_a_lora_model_score_as_the_merged_model(family, modules):
    m = lora_model(family)
    merged = copy.deepcopy(m).merge_and_unload()
    train, queries = data()
    ids = train[0]['input_ids'][None]
    with torch.no_grad(), m.disable_adapter(): plain = m(ids).logits   # the adapter changes the model (B is not zero)
    with torch.no_grad(): assert float((m(ids).logits - plain).abs().max()) > 1e-3
    kw = dict(strategy='ekfac', modules=modules, fisher='empirical', progress=False)
    fa, fb = inf.fit_factors(m, train, **kw), inf.fit_factors(merged, train, **kw)
    assert [merged_name(n) for n in fa.modules] == fb.modules
    assert not any(p in n for n in fa.modules for p in ('lora_A', 'lora_B'))       # adapters only under 'lora'
    for n in fa.modules:
        for k, t in fa.tensors[n].items():
            if k in ('A', 'S', 'lambda'):
                ref = fb.tensors[merged_name(n)][k]
                assert float((t - ref).abs().max()) <= 1e-9 * float(ref.abs().max()), (n, k)
    sa = inf.pairwise_scores(m, fa, queries, train, progress=False).total
    sb = inf.pairwise_scores(merged, fb, queries, train, progress=False).total
    assert float((sa - sb).abs().max()) <= 1e-8 * float(sb.abs().max())

def test_lora_matrices_identity_scores_equal_autograd():
    m = lora_model()
    train, queries = data()
    layers = find_modules(m, 'lora')
    assert [layer.name for layer in layers] == adapter_parts(m)['lora']
    assert all(('.lora_A.' in layer.name or '.lora_B.' in layer.name) for layer in layers) and len(layers) == 16
    params = dict(m.named_parameters())
    ps = [params[n] for n in randdata.layer_param_names(layers)]
    assert all(p.requires_grad for p in ps) and len(ps) == 16 and sum(p.requires_grad for p in params.values()) == 16
    with keep_precision(m):               # float64 throughout: Llama's norms and softmaxes compute in float32, and padding
        f = inf.fit_factors(m, train, 'identity', modules='lora', progress=False)     # moved their low bits (AVX2 CPUs)
        s = inf.pairwise_scores(m, f, queries, train, progress=False).total
        ref = randdata.autograd_grads(m, ps, queries) @ randdata.autograd_grads(m, ps, train).T
    assert float((s - ref).abs().max()) <= 1e-10 * float(ref.abs().max())

def test_lora_ekfac_self_scores_are_the_pairwise_diagonal():
    m = lora_model()
    train, _ = data()
    f = inf.fit_factors(m, train, 'ekfac', modules='lora', progress=False)
    pair = inf.pairwise_scores(m, f, train, train, progress=False).total
    own = inf.self_scores(m, f, train, progress=False)
    assert float((own - pair.diagonal()).abs().max()) <= 1e-8 * float(own.abs().max())

def test_dora_is_refused_and_merging_is_the_way():
    m = lora_model(dora=True)
    up = 'base_model.model.model.layers.0.mlp.up_proj'
    for modules in ('mlp', 'all', 'lora', [f'{up}.base_layer'], [f'{up}.lora_A.default']):
        with pytest.raises(ValueError, match=r"does more than add.*merge_and_unload"): find_modules(m, modules)
    merged = m.merge_and_unload()
    assert [layer.name for layer in find_modules(merged, 'mlp')][:3] == [
        'model.layers.0.mlp.gate_proj', 'model.layers.0.mlp.up_proj', 'model.layers.0.mlp.down_proj']

def test_an_adapter_on_the_lm_head_stays_untracked():
    torch.manual_seed(0)
    m = get_peft_model(tiny_model('llama', layers=1).double(), LoraConfig(r=2, target_modules=['up_proj', 'lm_head'],
                                                                          init_lora_weights=False))
    assert not [layer for layer in find_modules(m, 'all') if 'lm_head' in layer.name]
    with pytest.warns(UserWarning, match=r"leaves out the LM head's adapter \['base_model.model.lm_head.lora_A.default'"):
        names = [layer.name for layer in find_modules(m, 'lora')]
    assert names == [f'base_model.model.model.layers.0.mlp.up_proj.lora_{x}.default' for x in 'AB']

def test_adapters_that_do_not_run_are_not_tracked():
    with pytest.raises(ValueError, match="found no LoRA adapter that runs in LlamaForCausalLM"):
        find_modules(tiny_model('llama', layers=1), 'lora')
    m = lora_model(layers=1)
    with m.disable_adapter():
        with pytest.raises(ValueError, match=r"adapters \['default'\] do not run"): find_modules(m, 'lora')
        # disabled: the model is its base, and 'mlp' tracks the base weights without the adapter
        assert len(find_modules(m, 'mlp')) == 3
    m.base_model.merge_adapter()     # merged into the base weights: the base layers are the model's layers
    assert adapter_parts(m)['lora'] == [] and len(find_modules(m, 'mlp')) == 3

def test_factors_are_bound_to_the_adapter_weights():
    m = lora_model(layers=1)
    train, queries = data()
    for modules in ('lora', 'mlp'):
        f = inf.fit_factors(m, train, 'ekfac', modules=modules, progress=False)
        b = m.base_model.model.model.layers[0].mlp.up_proj.lora_B['default'].weight
        with torch.no_grad(): b.mul_(1.5)
        with pytest.raises(ValueError, match='mismatch'): inf.pairwise_scores(m, f, queries, train, progress=False)
        with torch.no_grad(): b.div_(1.5)

def test_an_adapter_folder_loads_with_its_base_and_scores_from_the_command_line(tmp_path):
    base_dir = randdata.model_folder(tmp_path)               # a tiny GPT-2 and the project tokenizer
    base, tok = inf.load_model(base_dir, dtype='float64')
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pm = get_peft_model(base, LoraConfig(r=4, target_modules=['c_fc'], fan_in_fan_out=True, init_lora_weights=False))
    pm.save_pretrained(tmp_path/'adapter')
    assert json.loads((tmp_path/'adapter'/'adapter_config.json').read_text())['base_model_name_or_path'] == str(base_dir)
    m, tok2 = inf.load_model(tmp_path/'adapter', dtype='float64')
    assert isinstance(m, PeftModel) and not m.training and len(tok2) == len(tok)
    ids = tok(['the cat sat on the mat'], return_tensors='pt')['input_ids']
    with torch.no_grad(): assert torch.equal(m(ids).logits, pm.eval()(ids).logits)
    texts = ['the cat sat on the mat', 'a dog ran in the park', 'the sun is warm today', 'birds sing in spring']
    (tmp_path/'train.txt').write_text('\n'.join(texts) + '\n')
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'q1', 'prompt': 'the cat', 'completion': ' sat on the mat'}) + '\n')
    rc, out, err = randdata.cli_run('fit-factors', '--model', tmp_path/'adapter', '--dtype', 'float64', '--modules', 'lora',
                                    '--data', tmp_path/'train.txt', '--out', tmp_path/'f', '--batch-size', 2)
    assert rc == 0, err
    rc, out, err = randdata.cli_run('score', '--model', tmp_path/'adapter', '--dtype', 'float64', '--factors', tmp_path/'f',
                                    '--queries', tmp_path/'q.jsonl', '--data', tmp_path/'train.txt', '--out', tmp_path/'s.parquet')
    assert rc == 0, err
    import pandas as pd
    got = pd.read_parquet(tmp_path/'s.parquet')
    f = inf.fit_factors(m, inf.tokenize(tok2, texts), 'ekfac', modules='lora', batch_size=2, progress=False)
    want = inf.pairwise_scores(m, f, inf.tokenize_pairs(tok2, [('the cat', ' sat on the mat')]), inf.tokenize(tok2, texts),
                               progress=False).total[0]
    assert list(got.columns) == ['q1'] and torch.allclose(torch.tensor(got['q1'].to_numpy()), want, rtol=1e-9, atol=0)

def adapter_case(tmp_path):
    "A LoRA adapter folder on a tiny GPT-2 (project tokenizer), four training texts and one query file."
    base_dir = randdata.model_folder(tmp_path)
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        pm = get_peft_model(inf.load_model(base_dir)[0], LoraConfig(r=4, target_modules=['c_fc', 'c_attn'], fan_in_fan_out=True,
                                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path/'adapter')
    texts = ['the cat sat on the mat', 'a dog ran in the park', 'the sun is warm today', 'birds sing in spring']
    (tmp_path/'train.txt').write_text('\n'.join(texts) + '\n')
    (tmp_path/'q.jsonl').write_text(json.dumps({'id': 'q1', 'prompt': 'the cat', 'completion': ' sat on the mat'}) + '\n')
    return tmp_path/'adapter', texts

def test_the_explorer_tracks_the_layers_asked_for_or_the_factors_own(tmp_path, monkeypatch):
    from influence_nb.explorer import ExplorerSession, run_query
    monkeypatch.setenv('INFLUENCE_NB_CACHE', str(tmp_path/'cache'))
    adapter, texts = adapter_case(tmp_path)
    m, tok = inf.load_model(adapter, dtype='float64')
    s = ExplorerSession(model=m, tokenizer=tok, corpus=texts, queries=[('the cat', ' sat on the mat')], fit_sample=0,
                        modules='lora')
    res = run_query(s, s.custom, query_id=s.queries[0]['id'], prefilter=False, k=2)
    lora = adapter_parts(m)['lora']
    assert res.all_layers == res.layers == lora and len(lora) == 8
    f = inf.fit_factors(m, inf.tokenize(tok, texts), 'ekfac', modules='lora', seed=0, batch_size=16, progress=False)
    want = inf.pairwise_scores(m, f, inf.tokenize_pairs(tok, [('the cat', ' sat on the mat')]), inf.tokenize(tok, texts),
                               progress=False).total[0]
    assert torch.allclose(torch.tensor(res.scores)[torch.argsort(torch.tensor(res.candidates))], want, rtol=1e-8, atol=0)
    s2 = ExplorerSession(model=m, tokenizer=tok, corpus=texts, factors=f)     # the factors' layers, named by their keyword
    assert s2.modules == 'lora'
    from influence_nb.explorer import Explorer                                # the header names where the curvature comes from
    head = Explorer(s2).children[0].value
    assert 'ekfac from the factors given (4 sequences, ' in head and 'other strategies are fitted once on all 4' in head
    assert 'Factors are fitted once per model and strategy on all 4 training sequences' in Explorer(s).children[0].value
    assert run_query(s2, s2.custom, prompt='the cat', completion=' sat on the mat', prefilter=False).all_layers == lora
    with pytest.raises(ValueError, match="leave `modules` out to use the factors' layers"):
        ExplorerSession(model=m, tokenizer=tok, corpus=texts, factors=f, modules='mlp')
    rc, out, err = randdata.cli_run('explore', '--model', adapter, '--dtype', 'float64', '--corpus', tmp_path/'train.txt',
                                    '--queries', tmp_path/'q.jsonl', '--modules', 'lora', '--fit-sample', 0, '--no-serve')
    assert rc == 0, err
    assert 'query q1' in out

def test_modules_to_save_track_the_copy_that_runs():
    torch.manual_seed(0)
    m = get_peft_model(tiny_model('llama', layers=2).double(), LoraConfig(r=2, target_modules=['up_proj'],
                       modules_to_save=['down_proj'], init_lora_weights=False)).eval()
    with torch.no_grad():                       # the saved copy differs from the original, as after fine-tuning
        for w in m.base_model.model.model.layers: w.mlp.down_proj.modules_to_save['default'].weight.mul_(1.3)
    names = [layer.name for layer in find_modules(m, 'mlp')]
    assert 'base_model.model.model.layers.0.mlp.down_proj.modules_to_save.default' in names
    assert not any('original_module' in n for n in names + [layer.name for layer in find_modules(m, 'all')])
    merged = copy.deepcopy(m).merge_and_unload()
    train, queries = data()
    kw = dict(strategy='ekfac', fisher='empirical', progress=False)
    sa = inf.pairwise_scores(m, inf.fit_factors(m, train, **kw), queries, train, progress=False).total
    sb = inf.pairwise_scores(merged, inf.fit_factors(merged, train, **kw), queries, train, progress=False).total
    assert float((sa - sb).abs().max()) <= 1e-8 * float(sb.abs().max())

def test_adapters_on_parameters_and_older_dora_are_refused():
    torch.manual_seed(0)
    pm = get_peft_model(tiny_model('mixtral', layers=1).double(), LoraConfig(r=2, target_modules=[],
                        target_parameters=['mlp.experts.gate_up_proj']))
    for modules in ('mlp', 'all', 'lora'):
        with pytest.raises(ValueError, match=r"not Linear layers \(`target_parameters`.*merge_and_unload"): find_modules(pm, modules)
    m = lora_model(layers=1, dora=True)           # peft < 0.15 marks DoRA in `use_dora` only, without `lora_variant`
    for t in m.modules():
        if hasattr(t, 'lora_variant'): t.lora_variant.clear(); t.use_dora = {'default': True}
    with pytest.raises(ValueError, match='does more than add'): find_modules(m, 'mlp')

def test_factors_are_bound_to_which_adapters_run_and_idle_ones_are_refused():
    m = lora_model(layers=1)
    train, queries = data()
    with m.disable_adapter(): f = inf.fit_factors(m, train, 'ekfac', modules='mlp', progress=False)
    with pytest.raises(ValueError, match=r"the adapters running in .*\(\[\] when fitted, \['default \(scaling 2\.0\)'\] now\)"):
        inf.pairwise_scores(m, f, queries, train, progress=False)
    m.add_adapter('other', LoraConfig(r=2, target_modules=['up_proj'], init_lora_weights=False))
    idle = 'base_model.model.model.layers.0.mlp.up_proj.lora_A.other'
    with pytest.raises(ValueError, match=r"does not run .*set_adapter"): find_modules(m, [idle])

def test_lora_tracks_what_the_adapter_trains_and_factors_know_its_scaling():
    torch.manual_seed(0)
    m = get_peft_model(tiny_model('llama', layers=1).double(), LoraConfig(r=2, target_modules=['up_proj'],
                       modules_to_save=['down_proj'], init_lora_weights=False)).eval()
    names = [layer.name for layer in find_modules(m, 'lora')]
    assert names == ['base_model.model.model.layers.0.mlp.up_proj.lora_A.default',
                     'base_model.model.model.layers.0.mlp.up_proj.lora_B.default',
                     'base_model.model.model.layers.0.mlp.down_proj.modules_to_save.default']   # trained whole: tracked too
    train, queries = data()
    with warnings.catch_warnings(), keep_precision(m):             # float64 throughout, as above
        warnings.simplefilter('error')                          # a list of what the adapter trains: nothing to warn about
        f = inf.fit_factors(m, train, 'identity', modules='lora', progress=False)
        s = inf.pairwise_scores(m, f, queries, train, progress=False).total
        params = dict(m.named_parameters())
        ps = [params[n] for n in randdata.layer_param_names(find_modules(m, 'lora'))]
        ref = randdata.autograd_grads(m, ps, queries) @ randdata.autograd_grads(m, ps, train).T
    assert sum(p.requires_grad for p in params.values()) == len(ps) == 3      # exactly the parameters peft trains: A, B, the copy
    assert float((s - ref).abs().max()) <= 1e-10 * float(ref.abs().max())
    m.base_model.model.model.layers[0].mlp.up_proj.scaling['default'] *= 4          # lora_alpha: the same weights
    with pytest.raises(ValueError, match=r"scaling 4\.0\)'\] when fitted, \['default \(scaling 16\.0\)'\] now"):
        inf.pairwise_scores(m, f, queries, train, progress=False)

def test_lora_names_what_peft_trains_whole_but_cannot_be_tracked_and_old_factors_say_why():
    torch.manual_seed(0)
    m = get_peft_model(tiny_model('llama', layers=1).double(), LoraConfig(r=2, target_modules=['up_proj'],
                       modules_to_save=['lm_head', 'embed_tokens'], init_lora_weights=False)).eval()
    with pytest.warns(UserWarning, match=r"leaves out what peft trains whole .*embed_tokens.modules_to_save.default.*lm_head"):
        assert len(find_modules(m, 'lora')) == 2
    train, queries = data()
    f = inf.fit_factors(m, train, 'identity', modules='lora', progress=False)
    digest = {k: v for k, v in f.info['model_digest'].items() if k != 'adapters'}    # as factors written before
    assert 'adapters' in f.info['model_digest']                                      # adapters were recorded
    old = inf.Factors(**{**f.__dict__, 'info': {**f.info, 'model_digest': digest}})
    with pytest.raises(ValueError, match='not recorded when these factors were fitted'):
        inf.pairwise_scores(m, old, queries, train, progress=False)
