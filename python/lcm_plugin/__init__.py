"""LCM distillation for SimpleTuner.

Importing this package is cheap: it pulls in neither torch nor SimpleTuner.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("simpletuner-lcm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
