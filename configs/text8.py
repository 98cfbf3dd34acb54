"""LaMemo on text8 (characters, `_` for space, 27 symbols), the original recipe (spec section 3).

Command:
    python train.py --config=configs/text8.py --workdir=runs/text8
    python train.py --config=configs/text8.py --config.model.memory=xl --workdir=runs/text8_xl  # baseline
    python eval.py --workdir=runs/text8 --split=test
Data: text8.zip, downloaded when the internet is there, else put `text8` (or text8.zip) in
--config.data.manual_dir.
Hardware: the original used 2 GPUs (2 x batch 20, fp16); here one process, global batch 40.
Params: LaMemo 40,965,147; Transformer-XL 40,964,635.
Expected: Transformer-XL's paper reports 1.08 bpc for a 24-layer 277M model; the 12-layer recipe
here is LaMemo's. Not run here (no GPU).
"""

from lamemo_jax.experiment import base_config


def get_config():
    c = base_config()
    c.model.update(n_token=27, n_layer=12, d_model=512, n_head=8, d_head=64, d_inner=2048,
                   dropout=0.1, dropatt=0.0, tgt_len=512, mem_len=512, clamp_len=-1,
                   memory="lamemo", lookahead="disentangled", tie_weight=True)
    c.data.name = "text8"
    c.data.manual_dir = None
    c.train.update(batch_size=40, num_steps=50_000, optimizer="adam", learning_rate=2.5e-4,
                   schedule="cosine", warmup_steps=0, min_learning_rate=0.0, clip=0.25,
                   halve_loss=True, log_every=200, eval_every=5000, checkpoint_every=5000)
    c.eval.update(tgt_len=512, mem_len=512, clamp_len=-1, same_length=False, batch_size=16, split="test")
    return c
