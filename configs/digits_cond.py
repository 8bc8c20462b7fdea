"""The embedded digits, class-conditional, trained for classifier-free guidance.

``configs/digits.py`` with the digit as the label and one example in ten trained without it
(``model.class_dropout = 0.1``, the rate GLIDE and DiT use), so that sampling can follow the label
more or less strongly: ``--guidance_scale=s`` (1 = as trained, 0 = unconditional, > 1 guided).

    python run.py --config=configs/digits_cond.py --workdir=workdir/digits_cond --mode=train
    python run.py --workdir=workdir/digits_cond --mode=sample --guidance_scale=3
"""

from configs import digits


def get_config():
    config = digits.get_config()

    config.data.class_cond = True
    config.data.num_classes = 10
    config.model.class_dropout = 0.1

    config.export.model_name = "digits_cond"
    return config
