"""Finding the SimpleTuner objects the patch groups change, and refusing clearly when one moved: every group checks
its surfaces with `require` / `import_surface` before `install()` changes anything."""

from __future__ import annotations

from importlib.metadata import version

TESTED_SIMPLETUNER_VERSIONS = ("4.10.1",)


class SimpleTunerSurfaceError(RuntimeError):
    """A SimpleTuner surface that install() patches is missing or changed shape."""


def require(owner, name: str, where: str):
    if not hasattr(owner, name):
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {simpletuner_version()}: {where}.{name} is missing "
            f"(tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        )
    return getattr(owner, name)


def import_surface(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise SimpleTunerSurfaceError(
            f"simpletuner-lcm cannot patch SimpleTuner {simpletuner_version()}: module {module} does not import "
            f"({error}; tested with SimpleTuner {', '.join(TESTED_SIMPLETUNER_VERSIONS)}). "
            "Set SIMPLETUNER_LCM_DISABLE=1 to run SimpleTuner without the plugin."
        ) from error


def simpletuner_version() -> str:
    try:
        return version("simpletuner")
    except Exception:  # noqa: BLE001 - a source checkout has no metadata; the seam checks still decide
        return "(unknown version)"


def has_accelerator(torch) -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return accelerator.is_available()
    return torch.cuda.is_available() or torch.backends.mps.is_available()
