"""LaMemo on enwik8 (bytes, newlines dropped, 204 symbols), the original recipe (spec section 3).

Command:
    python train.py --config=configs/enwik8.py --workdir=runs/enwik8
    python train.py --config=configs/enwik8.py --config.model.memory=xl --workdir=runs/enwik8_xl  # baseline
    python eval.py --workdir=runs/enwik8 --split=test
Data: enwik8.zip, downloaded when the internet is there, else put `enwik8` (or enwik8.zip) in
--config.data.manual_dir. `--config.data.keep_newlines=True` keeps newline bytes (moves bpc by ~0.02).
Hardware: the original used 2 GPUs (2 x batch 20, fp16); here one process, global batch 40.
Params: LaMemo 41,055,948; Transformer-XL 41,055,436.
Expected: Transformer-XL's paper reports 1.06 bpc for its 12-layer 41M model with a longer
evaluation memory; LaMemo's own tables could not be retrieved here. Not run here (no GPU).
"""

from lamemo_jax.data import default_config as data_config
from lamemo_jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.update(n_token=204, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048,
                   dropout=0.1, dropatt=0.0, tgt_len=512, mem_len=512, clamp_len=-1,
                   memory="lamemo", lookahead="disentangled", tie_weight=True)
    c.data = data_config("enwik8")  # every data field, typed (--config.data.manual_dir=DIR parses)
    c.data.keep_newlines = False
    c.train.update(batch_size=40, num_steps=50_000, optimizer="adam", learning_rate=2.5e-4,
                   schedule="cosine", warmup_steps=0, min_learning_rate=0.0, clip=0.25,
                   halve_loss=True, log_every=200, eval_every=5000, checkpoint_every=5000)
    c.eval.update(tgt_len=512, mem_len=512, clamp_len=-1, same_length=False, batch_size=16, split="test")
    return c
