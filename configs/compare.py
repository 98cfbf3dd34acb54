"""LaMemo vs Transformer-XL on offline real text (docs/results.md), one run per memory and seed.

Command (runs both memories and three seeds, then writes the tables and plots):
    python -m benchmarks.compare --dataset=wiki_chars --seeds=0,1,2     # 400 steps per run
    python -m benchmarks.compare --dataset=sotu_words --seeds=0,1,2     # 1000 steps per run
Trained longer (docs/results.md, the eighth session's tables; 5-10 minutes per run here):
    python -m benchmarks.compare --dataset=wiki_chars --seeds=0,1,2 --steps=6000  # 2.2 epochs
    python -m benchmarks.compare --dataset=sotu_words --seeds=0,1,2 --steps=2000  # 1 epoch
One run by hand:
    python train.py --config=configs/compare.py:wiki_chars --config.model.memory=xl --workdir=runs/c
Hardware: a 2-core CPU, a few minutes per run. Params: 4 layers, d_model 128, 4 x 32 heads,
d_inner 512, tgt_len = mem_len = 64 (LaMemo has one extra [4, 32] bias, v_, over XL: +128 params).
Expected: see docs/results.md for the measured numbers.
"""

from lamemo_jax.data import default_config as data_config
from lamemo_jax.experiment import base_config

N_TOKEN = {"wiki_chars": 27, "wiki_bytes": 200, "sotu_words": 16766}
STEPS = {"wiki_chars": 400, "wiki_bytes": 400, "sotu_words": 1000}  # the runs of docs/results.md


def get_config(dataset: str = "wiki_chars"):
    c = base_config()
    word = dataset == "sotu_words"
    c.model.update(n_token=N_TOKEN[dataset], n_layer=4, d_model=128, n_head=4, d_head=32, d_inner=512,
                   dropout=0.1, dropatt=0.0, tgt_len=64, mem_len=64, memory="lamemo",
                   d_embed=128, cutoffs=(2000, 8000) if word else (), div_val=4 if word else 1)
    c.data = data_config(dataset)
    c.train.update(batch_size=16, num_steps=STEPS[dataset], optimizer="adam", learning_rate=1e-3,
                   schedule="cosine", warmup_steps=100 if word else 50, min_learning_rate=1e-4, clip=0.25,
                   log_every=25, eval_every=0, eval_tokens=20_000, checkpoint_every=1000, seed=0)
    c.eval.update(tgt_len=64, mem_len=64, batch_size=16, split="test")
    return c
