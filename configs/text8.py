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

from configs import enwik8


def get_config():
    """The enwik8 recipe (same model and optimisation) on text8's 27 symbols."""
    c = enwik8.get_config()
    c.model.n_token = 27
    c.data.name = "text8"
    del c.data["keep_newlines"]  # byte corpora only
    return c
