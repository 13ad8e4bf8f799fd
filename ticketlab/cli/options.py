"""Command-line options generated from the hyperparameter declarations.

Nothing here names a hyperparameter: every ``--flag`` comes from an :class:`~ticketlab.hparams.
Option` on a dataclass field (:func:`ticketlab.hparams.options`), with its help, panel,
aliases and choices. Every generated option defaults to None ("not given"), and
:func:`ticketlab.hparams.build_hparams` fills the task's paper setting or the declared default
— the same function a sweep spec goes through, so the CLI and a spec can never disagree.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from ticketlab.cli.app import friendly
from ticketlab.hparams import OptionSpec, RunHparams, Runtime, build_hparams, options

#: Sections a training command takes; ``prune`` adds IMP's options.
TRAINING = ("model", "data", "options", "train", "prune")
ROOT_HELP = "Run store (default: $TICKETLAB_HOME/runs or ~/.ticketlab/runs)."


def _task_defaults() -> dict[str, dict[str, Any]]:
    """key -> {task: its paper setting} for every option some task sets (for --help)."""
    from ticketlab.tasks import TASK_NAMES, task_class

    out: dict[str, dict[str, Any]] = {}
    for name in TASK_NAMES:
        for key, value in task_class(name).paper_defaults.items():
            out.setdefault(key, {})[name] = value
    return out


def _default_text(spec: OptionSpec, per_task: dict[str, dict[str, Any]]) -> str:
    tasks = per_task.get(spec.key, {})
    base = spec.option.default_text or (
        "none" if spec.default in (None, ()) else
        (("on" if spec.default else "off") if isinstance(spec.default, bool) else
         f"{spec.default:g}" if isinstance(spec.default, float) else str(spec.default)))
    differ: dict[str, list[str]] = {}
    for task, value in tasks.items():
        if value != spec.default:
            shown = f"{value:g}" if isinstance(value, float) else str(value)
            differ.setdefault(shown, []).append(task)
    if not differ:
        return base
    parts = [f"{v} for {', '.join(ts)}" for v, ts in differ.items()]
    if spec.option.task_specific:
        return "; ".join(parts)
    return f"{base}; " + "; ".join(parts)


def _annotation(spec: OptionSpec) -> tuple[Any, dict[str, Any]]:
    """The CLI type of an option (always optional: None = not given) and typer extras."""
    want = spec.type
    union = typing.get_origin(want) in (typing.Union, types.UnionType)
    args = [a for a in (typing.get_args(want) if union else (want,)) if a is not type(None)]
    base = typing.get_origin(args[0]) or args[0]
    if base is bool:
        return bool | None, {"metavar": ""}
    if base is tuple:
        return list[str] | None, {"metavar": "REGEX"}
    if base is Path:
        return Path | None, {}
    return base | None, {}


def parameters(specs: Iterable[OptionSpec]) -> list[inspect.Parameter]:
    """typer parameters (keyword-only, named by key) for ``specs``."""
    per_task = _task_defaults()
    out = []
    for spec in specs:
        annotation, extra = _annotation(spec)
        flag = spec.flag
        decls = [f"{flag}/--no-{flag[2:]}"] if annotation == (bool | None) else [flag]
        decls += list(spec.option.aliases)
        help_text = spec.option.help
        if spec.option.more_help is not None:
            help_text += " " + spec.option.more_help()
        if spec.option.choices:
            help_text += f" One of: {', '.join(spec.option.choices)}."
        opt = typer.Option(None, *decls, help=escape(help_text),
                           rich_help_panel=spec.option.panel,
                           show_default=_default_text(spec, per_task), **extra)
        out.append(inspect.Parameter(spec.key, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                     annotation=annotation))
        for value_flag, value in spec.option.value_flags:
            out.append(inspect.Parameter(
                _flag_name(spec, value), inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                default=typer.Option(False, value_flag, help=f"Same as {spec.flag} {value}.",
                                     rich_help_panel=spec.option.panel, metavar="")))
    return out


def _flag_name(spec: OptionSpec, value: str) -> str:
    return f"{spec.key}__{value}"


def resolve_value_flags(opts: dict[str, Any]) -> None:
    """Turn the value flags (``--fp16``) into their option's value (``precision="fp16"``) in
    ``opts``; a flag that contradicts the option or another flag is refused."""
    from ticketlab.errors import TicketlabError

    for spec in options(("model", "data", "train", "prune", "runtime")).values():
        for value_flag, value in spec.option.value_flags:
            if not opts.pop(_flag_name(spec, value), False):
                continue
            given = opts.get(spec.key)
            if given is not None and given != value:
                raise TicketlabError(f"{value_flag} means {spec.flag} {value}, but "
                                     f"{spec.flag} {given} was also given.",
                                     "Give one of them.")
            opts[spec.key] = value


def runtime_parameters(root: bool = True) -> list[inspect.Parameter]:
    params = parameters(options(("runtime",)).values())
    if root:
        params.append(inspect.Parameter(
            "root", inspect.Parameter.KEYWORD_ONLY, annotation=Path | None,
            default=typer.Option(None, "--root", "--output-dir", help=ROOT_HELP,
                                 rich_help_panel="Runtime")))
    return params


def make_runtime(values: dict[str, Any], **defaults: Any) -> Runtime:
    """Runtime from the generated runtime options; one not given takes the command's default
    from ``defaults`` (sweeps store no weights unless asked), else the declared one."""
    keys = options(("runtime",))
    given = {k: values[k] for k in keys if values.get(k) is not None}
    return Runtime(**{**defaults, **given})


def resolve_root(root: Path | None) -> Path:
    from ticketlab.store import default_root

    return Path(root).expanduser() if root else default_root()


def _wrap(func: Callable[..., Any], extra: list[inspect.Parameter], reserved: tuple[str, ...],
          body: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]) -> Callable[..., Any]:
    """Give ``func`` a signature with ``extra`` options; ``body(options, kwargs)`` turns the
    options into the keyword arguments ``func`` receives in their place."""
    sig = inspect.signature(func)
    own = [p for p in sig.parameters.values() if p.name not in reserved]
    names = [p.name for p in extra]

    @functools.wraps(func)
    def wrapper(**kwargs: Any) -> Any:
        opts = {n: kwargs.pop(n) for n in names}
        resolve_value_flags(opts)
        return func(**body(opts, kwargs), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    del wrapper.__wrapped__  # typer must read the new signature, not the original
    return friendly(wrapper)


def _hparams_values(opts: dict[str, Any], sections: tuple[str, ...]) -> dict[str, Any]:
    keys = options(sections)
    return {k: v for k, v in opts.items() if k in keys}


def with_options(prune: bool = True) -> Callable[..., Any]:
    """Add every training option to a command; it receives ``hp``, ``runtime`` and ``root``
    (the command's own ``task`` option names the task the hparams are built for)."""
    sections = TRAINING
    specs = [s for s in options(sections).values() if prune or not s.option.prune_only]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        extra = parameters(specs) + runtime_parameters()

        def body(opts: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            hp = build_hparams(kwargs["task"], _hparams_values(opts, sections), prune=prune)
            return {"hp": hp, "runtime": make_runtime(opts), "root": resolve_root(opts["root"])}

        return _wrap(func, extra, ("hp", "runtime", "root"), body)

    return decorate


def with_task_options() -> Callable[..., Any]:
    """Like :func:`with_options`, for commands that span several tasks: the command receives
    ``build(task) -> RunHparams`` (every task gets its own paper defaults: a SQuAD target
    trains with SQuAD's lr and length), ``runtime`` and ``root``. ``--target-sparsity`` is left
    out: these commands decide how far IMP goes."""
    specs = [s for s in options(TRAINING).values() if s.key != "target_sparsity"]

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        extra = parameters(specs) + runtime_parameters()

        def body(opts: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
            values = _hparams_values(opts, TRAINING)
            values["target_sparsity"] = 0.0

            def build(task: str, drop_inactive: bool = False, **overrides: Any) -> RunHparams:
                return build_hparams(task, {**values, **overrides},
                                     drop_inactive=drop_inactive)

            return {"build": build, "runtime": make_runtime(opts),
                    "root": resolve_root(opts["root"])}

        return _wrap(func, extra, ("build", "runtime", "root"), body)

    return decorate
