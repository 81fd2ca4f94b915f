"""
Settings for every script, in nanoGPT's style: plain globals with a default, overridden by config
files and --key=value arguments, applied left to right:

    python train.py config/tasks_lora.py --batch_size=8 --datasets=data/tasks,data/alpaca --resume
    python train.py --help          # each setting with its default, allowed values and comment

A script declares each setting next to its default, with what it allows and a comment:

    learning_rate = S(3e-3, "(0, inf)", "peak learning rate")
    max_iters = S(1000, "[0, inf)", "optimizer steps")  # a bound may name a setting:
    warmup_iters = S(Rule("min(20, max_iters)", lambda s: min(20, s["max_iters"])),
                     "[0, max_iters]", "linear warmup steps")  # a default that follows: a Rule
    scaling = S("channel", ("channel", "scalar"), "MultiLoRA's s_i")  # choices
    device = S("cpu", check_device, "where to run")  # a function: (value, settings) -> None if
                                                     # the value is allowed, else what is expected

A Rule is a default computed from the final values of the other settings, once the config files
and arguments are in (a rule may read rules declared above it), and --help shows its text. So a
default never turns into an error because another setting changed (--max_iters=2 gives 2 warmup
steps), while a value given explicitly is still checked.

then `SETTINGS = declared(globals())` (the globals become plain defaults) and, in main,
`globals().update(configure(SETTINGS, argv))`. The value's type is the default's (an int is accepted
for a float; list items have the first item's type). Every setting is checked, ranges between
settings included, before the script reads or writes anything; a bad one is one line naming the
argument or config file, the key and what was expected. Rules that tie several settings together are
best plain checks in the script, after configure (train.py's check_settings). Config files are
Python (they are code you run, as a script is); their top-level names that don't start with "_" and
hold a setting's type are settings.
"""

import ast
import math
import os
import re
import sys

from util import UserError

TYPES = (bool, int, float, str, list, tuple)


class Setting:
    def __init__(self, default, allowed=None, help=""):
        self.default, self.allowed, self.help = default, allowed, help


class Rule:
    """A default that is a function of the final settings: Rule("text for --help", function)."""

    def __init__(self, text, function):
        self.text, self.function = text, function

    def __repr__(self):
        return self.text


S = Setting


def resolve(settings, final, explicit=()):
    """final with each Rule default not in explicit computed, in declaration order."""
    for k, s in settings.items():
        if isinstance(s.default, Rule) and k not in explicit:
            final[k] = s.default.function(final)
    return final


def declared(namespace):
    """{name: Setting} of a module's globals; those globals become the defaults (rules computed)."""
    settings = {k: v for k, v in namespace.items() if isinstance(v, Setting)}
    namespace.update(resolve(settings, {k: s.default for k, s in settings.items()}))
    return settings


def check_type(where, key, value, default):
    """value converted to the default's type where nothing is lost (int -> float, tuple <->
    list)."""
    expected = type(default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected in (list, tuple) and isinstance(value, (list, tuple)):
        kind = type(default[0]) if default else None
        if kind is None or all(
            type(v) is kind or (kind is float and type(v) is int) for v in value
        ):
            return expected(kind(v) if kind is float else v for v in value)
    elif type(value) is expected:
        return value
    raise UserError(f"{where}: {key}: expected {expected.__name__} like {default!r}, got {value!r}")


def parse_value(where, key, text, default):
    """The text of --key=value -> a value of the default's type."""
    if isinstance(default, str):
        return text  # verbatim: --out_dir=123 is the folder "123"
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if isinstance(default, (list, tuple)) and not text.startswith(("[", "(")):
        items = [item for item in text.split(",") if item]  # --datasets=data/a,data/b; '' is []
        if default and not isinstance(default[0], str):
            items = [parse_value(where, key, item, default[0]) for item in items]
        return check_type(where, key, type(default)(items), default)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(
            f"{where}: {key}: expected {type(default).__name__} like {default!r}, got {text!r}"
        ) from None
    return check_type(where, key, value, default)


INTERVAL = re.compile(r"\s*([\[(])\s*([^,]+?)\s*,\s*([^,]+?)\s*([\])])\s*")


def check_allowed(key, value, allowed, final):
    """None if value is allowed, else what was expected. allowed: None, a tuple of choices, an
    interval "[lo, hi)" whose bounds are numbers, inf or other settings' names, or a function."""
    if allowed is None:
        return None
    if callable(allowed):
        return allowed(value, final)
    values = value if isinstance(value, (list, tuple)) else [value]
    if isinstance(allowed, tuple):
        bad = [v for v in values if v not in allowed]
        return bad and f"one of {', '.join(map(str, allowed))}"
    left, lo, hi, right = INTERVAL.fullmatch(allowed).groups()
    bound = lambda b: final[b] if b in final else float(b)  # noqa: E731
    lo_v, hi_v = bound(lo), bound(hi)
    for v in values:
        if (
            math.isnan(v)
            or v < lo_v
            or v > hi_v
            or (left == "(" and v == lo_v)
            or (right == ")" and v == hi_v)
        ):
            names = f" ({lo} = {lo_v})" * (lo in final) + f" ({hi} = {hi_v})" * (hi in final)
            return f"a value in {allowed}{names}"
    return None


def help_text(settings, script):
    lines = [f"usage: python {script} [config/file.py ...] [--key=value ...]", "", "settings:"]
    for k, s in settings.items():
        allowed = (
            ""
            if s.allowed is None or callable(s.allowed)
            else f" {{{'|'.join(map(str, s.allowed))}}}"
            if isinstance(s.allowed, tuple)
            else f" {s.allowed}"
        )
        rule = isinstance(s.default, Rule)
        default = f" (default: {s.default.text})" if rule else f"={s.default!r}"
        lines.append(f"  --{k}{default}{allowed}" + (f"  # {s.help}" if s.help else ""))
    return "\n".join(lines)


def configure(settings, argv, script=None):
    """settings: {name: Setting, or a plain default}; argv: config files and --key=value, applied in
    order. Returns {name: final value}. --help (or -h) prints the settings and exits."""
    settings = {
        k: v if isinstance(v, Setting) else Setting(v)
        for k, v in settings.items()
        if isinstance(v, Setting) or (not k.startswith("_") and isinstance(v, TYPES))
    }
    # each setting's type is its default's; a rule's, that of its value on the other defaults
    typed = resolve(settings, {k: s.default for k, s in settings.items()})
    final, source = dict(typed), {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(settings, script or os.path.basename(sys.argv[0])))
            sys.exit(0)
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if key not in settings:
                raise unknown(arg, key, settings)
            if not has_value and not isinstance(final[key], bool):
                raise UserError(
                    f"{arg}: expected --{key}=value (a bare --{key} only for true/false settings)"
                )
            final[key] = parse_value(arg, key, text if has_value else "True", typed[key])
            source[key] = arg
        else:
            if not os.path.isfile(arg):
                raise UserError(
                    f"{arg}: no such config file (arguments are config files or --key=value)"
                )
            namespace = {}
            try:
                with open(arg) as f:
                    exec(compile(f.read(), arg, "exec"), namespace)
            except Exception as e:
                raise UserError(
                    f"{arg}: could not run the config file: {type(e).__name__}: {e}"
                ) from None
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, TYPES):
                    continue  # imports, helpers and _private names are not settings
                if key not in settings:
                    raise unknown(arg, key, settings)
                final[key] = check_type(arg, key, value, typed[key])
                source[key] = arg
    resolve(settings, final, explicit=source)  # the rules, from the final values of the others
    for key, s in settings.items():  # ranges and choices, once all values are known
        expected = check_allowed(key, final[key], s.allowed, final)
        if expected:
            where = f"{source[key]}: " if key in source else ""
            rule = isinstance(s.default, Rule)
            default = (
                ""
                if key in source
                else f" (its default, {s.default})"
                if rule
                else " (its default)"
            )
            raise UserError(f"{where}{key}: expected {expected}, got {final[key]!r}{default}")
    return final


def unknown(where, key, settings):
    return UserError(
        f"{where}: {key}: unknown setting; known settings: {', '.join(sorted(settings))}"
    )
