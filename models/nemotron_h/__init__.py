"""NemotronH (Nemotron-3-Nano-30B-A3B) hybrid Mamba2 / attention / MoE policy in pure JAX."""

from .config import ModelConfig, ModelConfigError, preset, with_overrides, PRESETS, normalize_remat, remat_for_kind
from .params import init_params, abstract_params, param_counts, param_specs, logical_axes
from .model import (forward, hidden_states, logits_from_hidden, prefill, prefill_continue, decode_step,
                    init_cache,
                    num_moe_layers)
from .checkpoint import (CheckpointError, load_checkpoint, save_checkpoint, hub_tensors,
                         params_from_hub_tensors, PARAMS_LAYOUT)
