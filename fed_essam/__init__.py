"""fed-essam: forward-only (ES / ESSAM) fine-tuning on seed-defined noise, centralized or federated.

The core is importable without Flower. Public API::

    fed_essam.ESSAM, fed_essam.ESSAMF, fed_essam.ES, fed_essam.MeZO   # optimizers
    fed_essam.noise(seed, tensor_index, shape)                        # seed-defined noise
    fed_essam.SeedUpdate, apply_update, perturbed, add_reversibly, undo, direction_norm, fingerprint
"""

from fed_essam.noise import noise
from fed_essam.optim import ES, ESSAM, ESSAMF, MeZO, StepRecord, replay
from fed_essam.perturb import (
    SeedUpdate,
    UndoLog,
    add_reversibly,
    apply_update,
    direction_norm,
    fingerprint,
    perturbed,
    trainable_parameters,
    undo,
)
from fed_essam.seeds import Phase, draw_seeds

__version__ = "0.1.0"

__all__ = [
    "ES",
    "ESSAM",
    "ESSAMF",
    "MeZO",
    "Phase",
    "SeedUpdate",
    "StepRecord",
    "UndoLog",
    "add_reversibly",
    "apply_update",
    "direction_norm",
    "draw_seeds",
    "fingerprint",
    "noise",
    "perturbed",
    "replay",
    "trainable_parameters",
    "undo",
]
