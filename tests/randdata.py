"Small random sequences and prompt/completion queries for the reliability and property tests."
import torch
import influence_nb as inf

VOCAB = 32


def rand_seqs(n, lo=4, hi=12, seed=0):
    "`n` sequences of random ids in [1, VOCAB-1), lengths drawn from [lo, hi)."
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([torch.randint(1, VOCAB - 1, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)
                             for _ in range(n)])


def rand_queries(n, seed=1):
    "`n` six-token queries whose last two tokens are the measured completion."
    g = torch.Generator().manual_seed(seed)
    return inf.as_sequences([{'input_ids': torch.randint(1, VOCAB - 1, (6,), generator=g),
                              'labels': [-100] * 4 + torch.randint(1, VOCAB - 1, (2,), generator=g).tolist()} for _ in range(n)])
