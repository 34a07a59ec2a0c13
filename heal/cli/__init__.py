"""The ``heal`` command.

Each subcommand lives in its own module of this package and exposes ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only when their
subcommand runs (or for ``--help``), and keep heavy imports (torch, transformers) inside ``run``
so that ``heal --help`` is instant.

Every parser here is a :class:`HealArgumentParser` (``add_subparsers`` hands the class down to the
subcommands' parsers, the nested ones of ``heal plot`` / ``heal bench`` included), so each
subcommand follows the same conventions without code of its own:

* ``--some_option`` is accepted wherever ``--some-option`` is (also ``--some_option=VALUE``);
* an unknown option or subcommand is reported with the closest known one ("did you mean ...?");
* ``--config FILE.yaml`` on every subcommand, keys = the long option names with ``-`` or ``_``
  (``general-per-batch`` or ``general_per_batch``). ``prepare``, ``mix`` and ``select`` load the file
  themselves, against their config schema; on the others (``demo``, ``plot``, ``env``, ``bench``) each key
  sets the default of its option, checked like the option's value, so the command line wins;
* ``heal --version``.

``key=value`` overrides on the command line (``heal mix k=32``) are not accepted: argparse cannot tell
them from positional arguments and option values that contain ``=`` (``heal prepare --field-map
question=Problem answer=Answer``, ``heal select --vllm-arg KEY=VALUE``, file names), so they would change
what existing command lines mean; ``--option VALUE`` and ``--config`` cover the same ground.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import importlib
import importlib.metadata
import sys
from typing import Any, Dict, List, Optional, Tuple

# name -> module implementing it, in the order a user meets them
SUBCOMMANDS = {
    "demo": "heal.cli.demo",
    "prepare": "heal.cli.prepare",
    "mix": "heal.cli.mix",
    "select": "heal.cli.select",
    "plot": "heal.cli.plot",
    "bench": "heal.cli.bench",
    "env": "heal.cli.env",
}

# the namespace attribute through which the deepest (sub)parser that ran makes itself known
_LEAF = "_heal_parser"


def _closest(word: str, candidates) -> Optional[str]:
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


class HealArgumentParser(argparse.ArgumentParser):
    """argparse with the conventions of the module docstring: underscore spellings of long options,
    "did you mean" for unknown options / choices / subcommands, and ``--config`` files for the
    subcommands that do not load one themselves."""

    # -------------------------------------------------------------- --some_option = --some-option

    def _hyphenate(self, args: List[str]) -> List[str]:
        """``--some_option[=V]`` as ``--some-option[=V]`` where this parser knows the hyphenated option
        (or, with abbreviations allowed, an option it starts). Options spelled with ``_`` on purpose
        (known as they are) and everything after ``--`` stay untouched."""
        known = self._option_string_actions
        longs = [o for o in known if o.startswith("--")]
        out = []
        for i, tok in enumerate(args):
            if tok == "--":
                out.extend(args[i:])
                break
            name, sep, value = tok.partition("=")
            if tok.startswith("--") and "_" in name[2:] and name not in known:
                hyphenated = "--" + name[2:].replace("_", "-")
                if hyphenated in known or (self.allow_abbrev and any(o.startswith(hyphenated) for o in longs)):
                    tok = hyphenated + sep + value
            out.append(tok)
        return out

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        ns, extras = super().parse_known_args(self._hyphenate(args), namespace)
        if not hasattr(ns, _LEAF):  # a subparser that ran inside this one has set itself already
            setattr(ns, _LEAF, self)
        return ns, extras

    # -------------------------------------------------------------- did you mean

    def _long_options(self) -> List[str]:
        return [o for a in self._actions if a.help != argparse.SUPPRESS for o in a.option_strings
                if o.startswith("--")]

    def _unrecognized(self, extras: List[str]) -> str:
        hints = []
        for tok in extras:
            if tok.startswith("--"):
                name = tok.partition("=")[0]
                near = _closest(name.replace("_", "-"), self._long_options())
                if near:
                    hints.append((name, near))
        msg = "unrecognized arguments: " + " ".join(extras)
        if len(hints) == 1:
            msg += f" (did you mean {hints[0][1]}?)"
        elif hints:
            msg += " (" + "; ".join(f"{wrong}: did you mean {near}?" for wrong, near in hints) + ")"
        return msg

    def _check_value(self, action, value):
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as exc:
            near = _closest(value, [str(c) for c in action.choices]) if isinstance(value, str) else None
            if near is None:
                raise
            raise argparse.ArgumentError(action, f"{exc.message}; did you mean {near!r}?") from None

    # -------------------------------------------------------------- parse_args: the above + --config

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        ns, extras = self.parse_known_args(args, copy.copy(namespace))
        leaf = vars(ns).pop(_LEAF, self)
        if extras:
            leaf.error(leaf._unrecognized(extras))
        if getattr(leaf, "_heal_generic_config", False) and getattr(ns, "config", None):
            ns = self._parse_with_config(leaf, ns.config, args, namespace)
        return ns

    def _parse_with_config(self, leaf: "HealArgumentParser", path: str, args: List[str], namespace):
        """Parse ``args`` again with the values of ``leaf``'s config file as its defaults."""
        defaults = leaf._config_defaults(path)
        saved = [(a, a.default) for a in leaf._actions if a.dest in defaults]
        saved_defaults = dict(leaf._defaults)
        leaf.set_defaults(**defaults)
        try:
            ns, _ = self.parse_known_args(args, copy.copy(namespace))
        finally:  # the parser is left as it was (it may parse again)
            for action, default in saved:
                action.default = default
            leaf._defaults.clear()
            leaf._defaults.update(saved_defaults)
        vars(ns).pop(_LEAF, None)
        # repeatable options: values on the command line replace the file's list instead of extending it
        for action in leaf._actions:
            start = defaults.get(action.dest)
            if isinstance(start, list) and isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
                got = getattr(ns, action.dest)
                if got is not start:  # argparse copied the default list and added the command line's
                    setattr(ns, action.dest, got[len(start):])
        return ns

    def _config_keys(self) -> Dict[str, Tuple[argparse.Action, bool]]:
        """key -> (action, named after the option rather than its destination), for every option a
        config file may set: the long option names with ``_`` for ``-``, then the destinations."""
        actions = [a for a in self._actions
                   if a.option_strings and a.help != argparse.SUPPRESS and a.dest not in ("help", "config")
                   and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]
        table: Dict[str, Tuple[argparse.Action, bool]] = {}
        for a in actions:
            for o in a.option_strings:
                if o.startswith("--"):
                    table.setdefault(o[2:].replace("-", "_"), (a, True))
        for a in actions:
            table.setdefault(a.dest, (a, False))
        return table

    def _config_defaults(self, path: str) -> Dict[str, Any]:
        """The option defaults a config file sets; a bad file or value ends here with the parser's error."""
        from heal.config import read_config_file

        try:
            data = read_config_file(path)  # keys in option spelling too; one key in two spellings is an error
        except (FileNotFoundError, ValueError) as exc:
            self.error(str(exc))
        table = self._config_keys()
        defaults: Dict[str, Any] = {}
        for key, value in data.items():
            name = key.replace("-", "_") if isinstance(key, str) else key
            if name not in table:
                near = _closest(str(name), table)
                self.error(f"{path}: unknown key {key!r} " + (f"(did you mean {near.replace('_', '-')!r}?)" if near
                                                               else f"(known: {', '.join(sorted(table))})"))
            if value is None:  # `key:` with no value: the option's own default
                continue
            action, by_option = table[name]
            try:
                defaults[action.dest] = self._config_value(action, by_option, value)
            except argparse.ArgumentError as exc:
                self.error(f"{path}: key {key!r}: {exc.message}")
            except ValueError as exc:
                self.error(f"{path}: key {key!r}: {exc}")
        return defaults

    def _config_value(self, action: argparse.Action, by_option: bool, value: Any) -> Any:
        """``value`` from a config file as the option would have stored it from the command line."""
        if action.nargs == 0:  # a flag
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            if isinstance(action, argparse.BooleanOptionalAction) or not by_option:
                return value  # `enforce-eager: false`, `progress: false` (the destination)
            return action.const if value else action.default  # `no-progress: true`
        if isinstance(value, dict):
            raise ValueError(f"expected a value, got a mapping {value!r}")
        repeatable = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
        several = action.nargs not in (None, argparse.OPTIONAL)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, (list, tuple)) and not (several or repeatable):
            raise ValueError(f"expected one value, got a list {value!r}")
        for item in items:
            if isinstance(item, (list, tuple, dict)):
                raise ValueError(f"expected plain values, got {item!r}")
        strings = [("true" if v else "false") if isinstance(v, bool) else str(v) for v in items]
        if repeatable and not several:
            return [self._get_values(action, [s]) for s in strings]
        if repeatable:
            return [self._get_values(action, strings)] if isinstance(action, argparse._AppendAction) \
                else list(self._get_values(action, strings))
        return self._get_values(action, strings)


def _leaves(parser: argparse.ArgumentParser):
    """The parsers that run a command: ``parser`` itself, or those under its subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
        return
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):
            yield from _leaves(child)


def _add_config_option(leaf: argparse.ArgumentParser) -> None:
    if "--config" in leaf._option_string_actions:  # the subcommand loads its config file itself
        return
    leaf.add_argument("--config", default=None, metavar="YAML",
                      help="YAML/JSON file of option values, keys = the long option names (- or _); "
                           "options given on the command line win")
    leaf._heal_generic_config = True


def _version() -> str:
    try:
        return importlib.metadata.version("heal")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        from heal import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = HealArgumentParser(
        prog="heal",
        description="HEAL: hybrid-domain entropy dynamics alignment for few-shot RLVR "
        "(fused entropy / EDA kernels, data selection, trainer integrations).",
    )
    parser.add_argument("--version", action="version", version=f"heal {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP))
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
        for leaf in _leaves(p):
            _add_config_option(leaf)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from heal.rollout.vllm import EntropyCaptureError, VLLMUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, VLLMUnavailableError, EntropyCaptureError) as exc:
        # bad input / bad config: one clear line, no traceback
        print(f"heal {args.command}: error: {exc}", file=sys.stderr)
        return 2
