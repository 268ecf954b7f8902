"""Many images: ``explain_many`` in Python, folders of files, every device, a Ray cluster.

Layers, bottom up: ``imagefiles`` (find and read images; crash-safe writes are
``krypton_fx.atomic``'s) -> ``sources`` (anything -> a stream of items) -> ``many``
(``explain_many``; one compile per size) -> ``outputs`` (the output folder:
names, resumption, summary) -> ``files`` (explain files into a folder, one
worker) -> ``devices`` (one worker per device) and ``cluster`` (Ray).
"""

from .many import explain_many

__all__ = ["explain_many"]
