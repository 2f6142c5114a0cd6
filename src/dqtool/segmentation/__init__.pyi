"""Public names of ``dqtool.segmentation`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .model_files import check_model_path, load_state_dict, build_net, discover_models, sidecar_paths
from .train import TrainConfig, TrainResult, train, train_patches
from .predict import PredictOptions, predict, segment
from .transfer import finetune, replay, sequence

__all__ = ['check_model_path', 'load_state_dict', 'build_net', 'discover_models', 'sidecar_paths', 'TrainConfig', 'TrainResult', 'train', 'train_patches', 'PredictOptions', 'predict', 'segment', 'finetune', 'replay', 'sequence']
