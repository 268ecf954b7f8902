"""Graph passes: PatchProp annotates, rewrite emits the incremental graph."""

from .patch_prop import PatchInfo, PatchProp, Read
from .rewrite import IncrementalProgram, PatchFill, StoredSpec, build_capture_module, rewrite

__all__ = ["PatchInfo", "PatchProp", "Read", "IncrementalProgram", "PatchFill", "StoredSpec",
           "build_capture_module", "rewrite"]
