"""The ``krypton-fx`` command line: ``explain``, ``demo``, ``speedup`` and ``bench``.

Every user error ends the same way: exit status 2 and one line on stderr,
``krypton-fx: error: <what is wrong>; <how to fix it>`` -- never a traceback
(set ``KRYPTON_FX_DEBUG=1`` to get one). Output paths are checked for
writability before the long work starts, and files are written to a
temporary file next to the target and renamed into place only once
everything succeeded, so a failed run leaves no output file behind.

One job a module, imported downward only (``errors`` -> ``options``,
``files``, ``images`` -> one module per command -> ``parser``):

- ``errors``: the error policy's pieces (``CLIError``, one-line messages, the log handler).
- ``options``: argument types and shared checks (patch, device, drill-down).
- ``files``: output files and folders, checked early and written atomically.
- ``images``: image files to model inputs (``read_image``, ``Preprocessing``).
- ``explain``, ``explain_files``, ``explain_volume``, ``demo``, ``demo_volume``, ``speedup``,
  ``bench``: the commands (a volume, NIfTI or ``.npy``, is ``explain_volume``'s; volume
  files themselves are :mod:`krypton_fx.volumes`').
- ``parser``: ``build_parser`` and ``main``.

Models and weights are loaded by the public :mod:`krypton_fx.models`.

Examples:
    $ krypton-fx explain cat.jpg --model resnet18 --weights DEFAULT --out cat-heat.png
    $ krypton-fx explain scans/ 'more/*.png' --model resnet18 --out-dir maps --devices all
    $ krypton-fx explain scan.png --model mypkg.nets:build --weights run3.ckpt --size 128
    $ krypton-fx explain ct.nii.gz --model monai:resnet18 --spatial-dims 3 --in-channels 1 \
          --num-classes 2 --weights run3.ckpt --intensity window:-1000,400 --out ct.png
    $ krypton-fx demo                       # offline: a small lesion model, trained once
    $ krypton-fx demo --volume              # the same in 3-D: synthetic volumes, a small 3-D CNN
    $ krypton-fx speedup --model vgg16
    $ python -m krypton_fx bench --models resnet18,squeezenet1_0 --size 64 --positions 8
"""

from ..models import LoadedModel, load_model
from .errors import CLIError
from .images import Preprocessing, preprocessing_for, read_image
from .parser import build_parser, main

__all__ = ["main", "build_parser", "CLIError", "load_model", "LoadedModel", "read_image",
           "Preprocessing", "preprocessing_for"]
