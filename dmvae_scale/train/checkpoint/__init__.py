"""A run's checkpoints: the store of files (store.py), what a checkpoint means (meaning.py), the manager that owns
cadence, write and restore of the parts that checkpoint themselves (manager.py), durable writes (durable.py), and
offline export of consolidated weights (export.py)."""
from .manager import RANK_STATE_FORMAT, CheckpointManager, read_rank_parts, write_checkpoint
from .meaning import (MEANING_SECTIONS, RUNTIME_ONLY_KEYS, ResumeRefusedError, check_resume, check_zero_stage,
                      meaning_of, param_shapes, refuse_changed_meaning, upstream_latents)
from .store import (CHECKPOINT_FORMAT, MANIFEST, CheckpointError, CheckpointInfo, CheckpointStore, checkpoint_name,
                    rank_state_file)

__all__ = ["CHECKPOINT_FORMAT", "MANIFEST", "MEANING_SECTIONS", "RANK_STATE_FORMAT", "RUNTIME_ONLY_KEYS",
           "CheckpointError", "CheckpointInfo", "CheckpointManager", "CheckpointStore", "ResumeRefusedError",
           "check_resume", "check_zero_stage", "checkpoint_name", "meaning_of", "param_shapes", "rank_state_file",
           "read_rank_parts", "refuse_changed_meaning", "upstream_latents", "write_checkpoint"]
