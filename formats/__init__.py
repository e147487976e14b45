"""The contract between the cloud and the device: feature sets, their manifest, adaptor checkpoints.

This package depends on numpy and safetensors only; neither side's code is imported here.
"""

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .errors import FormatError
from .feature_set import FeatureSet, check_compatible, sha256_file
from .manifest import FORMAT_VERSION, Manifest, Shard
from .writer import FeatureSetWriter

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "FeatureSet",
    "FeatureSetWriter",
    "FormatError",
    "Manifest",
    "Shard",
    "check_compatible",
    "load_checkpoint",
    "save_checkpoint",
    "sha256_file",
]
