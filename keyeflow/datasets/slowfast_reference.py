"""Loads the reference preprocessing, ``keye-vl-utils`` (a dev dependency), for side-by-side checks.

Its ``vision_process`` module imports torchvision at module level for image and video readers that the
comparisons never call (smart_resize, extract_slow_fast_frames, get_frame_sim, fetch_video's size search),
and torchvision cannot be imported here (no CPU build for this torch). Empty stand-in modules let it load;
they leave ``sys.modules`` again at once so nothing else sees them.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_keye_vl_utils():
    names = ("torchvision", "torchvision.io", "torchvision.transforms")
    saved = {name: sys.modules.get(name) for name in names}
    stubs = {name: types.ModuleType(name) for name in names}
    stubs["torchvision"].io = stubs["torchvision.io"]
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].InterpolationMode = type("InterpolationMode", (), {})
    sys.modules.update(stubs)
    try:
        return importlib.import_module("keye_vl_utils.vision_process")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
