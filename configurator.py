"""
Settings overrides for train.py and bench.py, in nanoGPT's style:

    python train.py config/tasks_lora.py --batch_size=8 --datasets=data/tasks,data/alpaca --resume

A script keeps its settings as plain globals with defaults and calls `configure(globals(), argv)`:
config files (Python files whose top-level names are settings) and `--key=value` arguments are
applied left to right, the dict is updated in place, and the final settings are returned as a dict
(what train.py prints and saves in its checkpoints). Settings are the names that do not start with
"_" and hold a bool, int, float, str, list or tuple. Every value must have the type of the default
(an int is accepted where the default is a float); unknown names are refused with the known ones.
"""
import ast
import os

from llama import UserError


def parse_value(where, key, text, default):
    """Text of a --key=value argument -> a value of the default's type."""
    if isinstance(default, str):
        return text  # strings are taken verbatim: --out_dir=123 is the directory "123"
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if isinstance(default, (list, tuple)) and not text.startswith(("[", "(")):
        # --datasets=data/a,data/b; an empty value is the empty list
        items = [item for item in text.split(",") if item != ""]
        kind = type(default[0]) if default else str
        if kind is not str:
            items = [parse_value(where, key, item, default[0]) for item in items]
        return check_type(where, key, type(default)(items), default)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"{where}: {key}: expected type {type(default).__name__} "
                        f"like {default!r}, got {text!r}") from None
    return check_type(where, key, value, default)


def check_type(where, key, value, default):
    """value, converted to the default's type where that loses nothing (int -> float,
    tuple <-> list); anything else is a UserError."""
    expected = type(default)
    if isinstance(value, bool) != (expected is bool):
        ok = False
    elif expected is float and isinstance(value, int):
        value, ok = float(value), True
    elif expected in (list, tuple) and isinstance(value, (list, tuple)):
        kind = type(default[0]) if default else None
        ok = kind is None or all(isinstance(item, kind) and not (kind is not bool and isinstance(item, bool))
                                 for item in value)
        value = expected(value)
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise UserError(f"{where}: {key}: expected type {expected.__name__} like {default!r}, got {value!r}")
    return value


def unknown(where, key, defaults):
    return UserError(f"{where}: {key}: unknown setting; known settings: {', '.join(sorted(defaults))}")


SETTING_TYPES = (bool, int, float, str, list, tuple)


def configure(settings, argv):
    """settings: {name: default}, e.g. a script's globals(); argv: config file paths and --key=value,
    applied in order. Updates settings in place; returns {name: final value} for the settings alone."""
    defaults = {k: v for k, v in settings.items() if not k.startswith("_") and isinstance(v, SETTING_TYPES)}
    final = dict(defaults)
    for arg in argv:
        if arg.startswith("--"):
            key, has_value, text = arg[2:].partition("=")
            if key not in defaults:
                raise unknown(arg, key, defaults)
            if not has_value:
                if not isinstance(defaults[key], bool):
                    raise UserError(f"{arg}: expected --key=value (a bare --{key} only for true/false settings)")
                text = "True"  # --resume is --resume=True
            final[key] = parse_value(arg, key, text, defaults[key])
        else:
            if not os.path.isfile(arg):
                raise UserError(f"{arg}: no such config file (arguments are config files or --key=value)")
            with open(arg) as f:
                source = f.read()
            namespace = {}
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:
                raise UserError(f"{arg}: could not run the config file: {type(e).__name__}: {e}") from None
            for key, value in namespace.items():
                # imports, helpers and _private names in a config file are not settings
                if key.startswith("_") or not isinstance(value, SETTING_TYPES):
                    continue
                if key not in defaults:
                    raise unknown(arg, key, defaults)
                final[key] = check_type(arg, key, value, defaults[key])
    settings.update(final)
    return final
