"""Which engine answers a project: its choice (``extra_params.engine`` / ``model_version``) against
what the deployment serves now. Shared by both modes; torch-free.

``served`` maps an engine name (:class:`backend.settings.EngineKind` value) to the model versions
it serves: the loaded pipelines in embedded mode, the live workers in queue mode. A project that
chose nothing gets the deployment's default engine (``ENGINE``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from backend.errors import EngineNotServed
from backend.ls.options import OptionsError, PredictOptions


def choose_engine(options: PredictOptions, default: str, served: Mapping[str, Iterable[str]]) -> str:
    """The engine that answers a project with ``options``: the one serving its ``model_version``
    (when set), else its ``engine``, else ``default``. Raises :class:`EngineNotServed` when no
    engine serves the chosen version (that engine may have no live worker right now)."""
    if options.model_version is None:
        return options.engine or default
    for engine, versions in served.items():
        if options.model_version in versions and options.engine in (None, engine):
            return engine
    raise EngineNotServed(f"no engine serves model_version {options.model_version!r} right now "
                          f"(served: {describe(served)}); start a worker of that version, or change the "
                          "project's extra_params")


def check_choice(options: PredictOptions, served: Mapping[str, Iterable[str]], loadable: Iterable[str] | None,
                 how: str) -> None:
    """``/setup``'s check of a project's choice. ``loadable``: the engines this deployment can ever
    serve (embedded: ENGINES), None when any engine may come (queue mode: workers may start later);
    ``how``: what to do to serve another. Raises OptionsError (400) saying what to fix."""
    if loadable is not None and options.engine is not None and options.engine not in set(loadable):
        raise OptionsError(f"extra_params.engine={options.engine!r} is not served here: {how}")
    if options.model_version is not None:
        try:
            choose_engine(options, "", served)
        except EngineNotServed:
            raise OptionsError(f"extra_params.model_version={options.model_version!r} is not served here "
                               f"(served: {describe(served)}); use one of GET /versions") from None


def engine_state(options: PredictOptions, default: str, served: Mapping[str, list[str]]) -> dict:
    """What a project with ``options`` uses: ``{"engine", "engine_served", "engines", "model_version"}``
    (``GET /projects/<id>/settings``; ``model_version``, the version its engine serves, is what
    ``/setup`` answers LS, None when the engine is not served)."""
    try:
        engine = choose_engine(options, default, served)
    except EngineNotServed:
        engine = options.engine or default
    versions = list(served.get(engine) or [])
    if options.model_version in versions:
        versions = [options.model_version]
    return {"engine": engine, "engine_served": engine in served, "engines": dict(served),
            "model_version": versions[0] if versions else None}


def describe(served: Mapping[str, Iterable[str]]) -> str:
    """``"grounded-sam: v1, v2; sam3: v3"``, or ``"nothing"``."""
    parts = [f"{engine}: {', '.join(sorted(versions))}" for engine, versions in sorted(served.items())]
    return "; ".join(parts) or "nothing"


__all__ = ["check_choice", "choose_engine", "describe", "engine_state"]
