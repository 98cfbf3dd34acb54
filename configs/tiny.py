"""A tiny LaMemo on the offline text8-style Wikipedia corpus, for tests and smoke runs.

Command:
    python train.py --config=configs/tiny.py --workdir=/tmp/tiny
Hardware: any CPU, seconds. Params: 19,867 (2 layers, d_model 32, 27 symbols).
Expected: the loss falls from ln(27) = 3.30 nats within 30 steps; not a meaningful model.
"""

from lamemo_jax.data import default_config as data_config
from lamemo_jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.update(n_token=27, n_layer=2, d_model=32, n_head=2, d_head=16, d_inner=64, dropout=0.0,
                   dropatt=0.0, tgt_len=16, mem_len=16, memory="lamemo")
    c.data = data_config("wiki_chars")
    c.train.update(batch_size=4, num_steps=30, learning_rate=3e-3, schedule="constant", clip=1.0,
                   log_every=10, eval_every=0, eval_tokens=2000, checkpoint_every=15, progress_bar=False)
    c.eval.update(batch_size=4, split="valid")
    return c
