"""cmad."""
import os as _os

# MKL's matrix products split their work by thread count unless in strict conditional
# numerical reproducibility mode; with it, features (and so models) are bit-identical for
# any thread count. Read by MKL at its first call, so this must run before any torch math.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
