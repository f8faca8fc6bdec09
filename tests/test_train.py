"The shipped tokenizer and GPT-2 family load offline, have the documented sizes, and gpt2-l knows its facts."
import json, os, random
import pytest, torch
from transformers import AutoTokenizer
from influence_nb.data import data_dir
from influence_nb import train
from influence_nb.corpus import load_queries

os.environ.setdefault('HF_HUB_OFFLINE', '1')

def test_tokenizer_offline():
    tok = AutoTokenizer.from_pretrained(str(data_dir()/'tokenizer'))
    assert len(tok) == 2048 and tok.bos_token_id == 0 and tok.pad_token_id == 1
    ids = tok('The capital of').input_ids
    assert ids[0] == 0 and tok.decode(ids[1:]) == 'The capital of'

@pytest.mark.parametrize('name', list(train.SIZES))
def test_models_load_with_sizes(name):
    m = train.shipped_model(name)
    from transformers import GPT2LMHeadModel
    assert train.n_params(m) == train.n_params(GPT2LMHeadModel(train.model_config(name)))
    assert m.config.n_positions == 128 and m.config.vocab_size == 2048
    assert m.config.resid_pdrop == m.config.attn_pdrop == m.config.embd_pdrop == 0
    assert (data_dir()/'models'/name/'model.safetensors').exists()
    log = json.loads((data_dir()/'models'/name/'train_log.json').read_text())
    assert log['n_params'] == train.n_params(m)

def test_unknown_size():
    with pytest.raises(ValueError, match='gpt2-m'): train.shipped_model('huge')

def test_gpt2_l_recall():
    torch.set_num_threads(1)
    tok = train.shipped_tokenizer()
    qs = [q for q in load_queries(kind='fact', lang='en')
          if 'en' in q['langs_in_training'] and 'forward' in q['orders_in_training']]
    sample = random.Random(0).sample(qs, 100)
    df = train.fact_recall(train.shipped_model('gpt2-l'), tok, sample, progress=False)
    assert df.correct.mean() >= 0.75
