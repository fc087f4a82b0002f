"""tq_mooncake.autoload: the TransferQueue backend, registered in every process that imports ``transfer_queue``.

The install (wheel or editable) puts ``tq_mooncake-autoload.pth`` into site-packages. Its one line calls
``install()`` at interpreter start, which only puts a ``PostImportHook`` on ``sys.meta_path``: this module uses
nothing beyond ``sys`` and ``os`` (both loaded by then), and TQ, torch and the rest of tq-mooncake stay
unimported. When the process itself imports ``transfer_queue`` (driver, Ray worker, subprocess), the hook lets
TQ's package run as usual and then imports ``tq_mooncake.transferqueue``, which registers the
``MooncakeStoreObserved`` backend and the ``replace_stock`` switch. Without TQ installed nothing happens.

``TQ_MOONCAKE_AUTOLOAD=0`` (or ``false``, ``no``, ``off``) in the environment at start turns it off. Not
covered: an interpreter started with ``-S`` (no ``site``, so no ``.pth`` lines run).
"""

import os
import sys

# Nothing beyond what `site` has loaded is imported at start: no `typing`, no `__future__` (annotations are strings).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any

ENV_SWITCH = "TQ_MOONCAKE_AUTOLOAD"
TARGET = "transfer_queue"
_OFF = ("0", "false", "no", "off")


def enabled(environ: "Any" = os.environ) -> bool:
    """Whether ``ENV_SWITCH`` leaves the hook on (unset or any value but 0/false/no/off)."""
    return str(environ.get(ENV_SWITCH, "")).strip().lower() not in _OFF


class PostImportHook:
    """A one-shot ``sys.meta_path`` finder: once module ``name`` has run its own loader without raising, it
    takes itself off ``sys.meta_path`` and calls ``callback(module)``.

    It finds nothing itself: it asks the finders after it and, when one finds ``name``, wraps that loader's
    ``exec_module`` (the module's ``__loader__`` and ``__spec__.loader`` stay the real loader). Other names cost
    one string comparison. An import of ``name`` that raises leaves the hook armed for the next try. An
    exception from ``callback`` is turned into a ``RuntimeWarning`` (see ``fire``); the import still succeeds.
    """

    def __init__(self, name: str, callback: "Callable[[ModuleType], None]") -> None:
        self.name = name
        self.callback = callback
        self._finding = False

    def find_spec(self, fullname: str, path: "Any" = None, target: "Any" = None) -> "Any":
        if fullname != self.name or self._finding:
            return None
        self._finding = True  # the module's lock is held: only this thread can be here for this name
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._finding = False
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RunThenCall(spec.loader, self)
        return spec

    def fire(self, module: "ModuleType") -> None:
        """Disarm, then run the callback on the imported ``module``; an exception from it becomes a
        ``RuntimeWarning`` (logged as an error where warnings are errors: ``-W error`` must not break the import)."""
        self.remove()
        try:
            self.callback(module)
        except Exception as exc:  # a broken registration must never break `import transfer_queue`
            import warnings

            message = (
                f"tq-mooncake: {self.name} was imported, but {self.callback.__name__} failed: {exc!r}. "
                f"`import tq_mooncake.transferqueue` shows the traceback; {ENV_SWITCH}=0 turns this hook off."
            )
            try:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            except Warning:
                import logging

                logging.getLogger(__name__).error(message)

    def remove(self) -> None:
        """Take this hook off ``sys.meta_path`` (no-op when it is not there)."""
        try:
            sys.meta_path.remove(self)
        except ValueError:
            pass


class _RunThenCall:
    """A loader proxy: runs the real loader's ``exec_module``, then fires the hook."""

    def __init__(self, loader: "Any", hook: PostImportHook) -> None:
        self._loader = loader
        self._hook = hook

    def create_module(self, spec: "Any") -> "Any":
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module: "ModuleType") -> None:
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._hook.fire(module)

    def __getattr__(self, name: str) -> "Any":
        return getattr(self._loader, name)


def register_backend(_module: "ModuleType | None" = None) -> None:
    """Import ``tq_mooncake.transferqueue``, which registers the backend with TQ's registries (idempotent; all or
    nothing)."""
    import tq_mooncake.transferqueue  # noqa: F401


def install(environ: "Any" = os.environ) -> "PostImportHook | None":
    """Arm the hook (the ``.pth`` line calls this); idempotent. Registers at once when ``transfer_queue`` is
    already imported. None when ``ENV_SWITCH`` turns it off or nothing was left to arm."""
    if not enabled(environ):
        return None
    if sys.modules.get(TARGET) is not None:
        register_backend()
        return None
    for finder in sys.meta_path:
        if isinstance(finder, PostImportHook) and finder.name == TARGET:
            return finder
    hook = PostImportHook(TARGET, register_backend)
    sys.meta_path.insert(0, hook)
    return hook
