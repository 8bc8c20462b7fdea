"""The config stored in a workdir, as a config file, so that ``--config.x=...`` overrides apply.

A training run stores its resolved config as ``<workdir>/config.json``; later runs without
``--config`` reuse it.  ``run.py`` loads the stored config through this file by itself when it is
given ``--config.x=...`` overrides but no ``--config``, so both of these change a field for one
later run (e.g. the evaluation split):

    python run.py --workdir=/ckpt/run1 --mode=eval --config.data.eval_split=train
    python run.py --workdir=/ckpt/run1 --mode=eval \\
        --config=configs/from_workdir.py:/ckpt/run1 --config.data.eval_split=train

The part after ``:`` is the workdir (or the path of a ``config.json``).  Fields that define the
experiment must still match the stored config; see ``tf_iddpm.config_utils``.
"""

from configs import base
from tf_iddpm import config_utils


def get_config(workdir_or_json_path=None):
    if not workdir_or_json_path:
        raise ValueError(
            "configs/from_workdir.py needs the workdir after a colon, e.g. "
            "--config=configs/from_workdir.py:/ckpt/run1"
        )
    # Fields added to configs/base.py after the workdir was started get their defaults (logged),
    # so that they can be overridden too.
    return config_utils.load_stored_config(workdir_or_json_path, defaults=base.get_config())
