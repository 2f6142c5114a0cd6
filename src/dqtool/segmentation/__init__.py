"""Cellpose: model files, training, prediction, transfer (finetune, replay, sequence) and forgetting.

Public names are re-exported here and imported on first use (``lazy_loader``), so importing one
submodule never loads the others (and their heavy dependencies).
"""

import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=['model_files', 'predict', 'train', 'transfer'],
    submod_attrs={
        "model_files": ['check_model_path', 'load_state_dict', 'build_net', 'discover_models', 'sidecar_paths'],
        "train": ['TrainConfig', 'TrainResult', 'train', 'train_patches'],
        "predict": ['PredictOptions', 'predict', 'segment'],
        "transfer": ['finetune', 'replay', 'sequence'],
    },
)
