"""Public names of ``dqtool.segmentation`` (read by lazy_loader.attach_stub; also for type checkers)."""

from .model_files import check_model_path, load_state_dict, build_net, discover_models, sidecar_paths
from .model_files import builtin_models, load_cellpose_model, training_diameters
from .export_model import export_model
from .train import TrainConfig, TrainResult, train, train_patches
from .predict import PredictOptions, predict, segment
from .transfer import finetune, replay, sequence

__all__ = ['check_model_path', 'load_state_dict', 'build_net', 'discover_models', 'sidecar_paths', 'builtin_models', 'load_cellpose_model', 'training_diameters', 'export_model', 'TrainConfig', 'TrainResult', 'train', 'train_patches', 'PredictOptions', 'predict', 'segment', 'finetune', 'replay', 'sequence']
