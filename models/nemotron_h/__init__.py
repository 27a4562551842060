"""NemotronH (Nemotron-3-Nano-30B-A3B) hybrid Mamba2 / attention / MoE policy in pure JAX."""

from .config import ModelConfig, ModelConfigError, preset, PRESETS
from .params import init_params, abstract_params, param_counts, param_specs, logical_axes
